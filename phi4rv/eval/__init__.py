"""`phi4rv eval`: accuracy, time and output tokens per reasoning mode, on the paper's benchmarks.

    phi4rv eval run --model runs/tiny --tasks chartqa,mathvista,mmmu,screenspot_v2 \\
        --modes auto,think,nothink --data-dir benchmarks/ --limit 100 --seed 0 --out runs/eval/tiny
    phi4rv eval run --endpoint http://127.0.0.1:8000/v1 --served-model phi4rv --tasks ai2d --out runs/eval/served
    phi4rv eval report runs/eval/tiny runs/eval/served --out runs/eval/report
    phi4rv eval score --task mmmu --predictions preds.jsonl --data-dir benchmarks/
    phi4rv eval tasks

From Python: `tasks.get_task(name)` → `runner.load_task(task, data_dir)` → `runner.run_eval(RunConfig(...),
backends.LocalBackend(dir) | backends.HTTPBackend(url, name))` → `report.write_report(run_dirs, out)`;
`runner.score_output(task, sample, raw_text)` scores one output.

Modules: `tasks/` (one per benchmark: loader, prompt, scorer, version), `extract.py` (final
spans, letters, clicks; the reasoning split is `processing.reasoning`, numbers and normalisation
`processing.answers`), `official.py` (the benchmarks' official scoring rules, the default), `scoring.py` (the lenient rules, `--rules lenient`), `backends.py`, `records.py`
(JSONL records and run.json, resume), `runner.py`, `report.py` (tables, average, Pareto),
`judge.py` (optional MathVista LLM extractor), `cli.py`.
"""
