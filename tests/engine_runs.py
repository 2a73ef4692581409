"""Driving the server's engine directly in tests: every request submitted at once, each
request's events collected until it finishes (or fails)."""

import threading

from phi4rv.serve.engine import Engine, EngineRequest


def run_engine(cm, requests, params, max_batch=2, timeout=120, queued=False, **engine_kw):
    """Submit every request at once to a running engine (fewer slots than requests: some queue);
    `queued`: all submitted before the engine starts. `params`: one GenerationParams for all, or a
    list with one per request."""
    per_request = params if isinstance(params, list) else [params] * len(requests)
    engine = Engine(cm.model, cm.tokenizer, max_batch=max_batch, **engine_kw)
    if not queued:
        engine.start()
    out = [[] for _ in requests]
    done = threading.Semaphore(0)

    def emit(i):
        def f(ev):
            out[i].append(ev)
            if isinstance(ev, BaseException) or ev.finish_reason is not None:
                done.release()
        return f

    try:
        for i, (r, p) in enumerate(zip(requests, per_request)):
            engine.submit(EngineRequest(r, p, emit(i)))
        if queued:
            engine.start()
        for _ in requests:
            assert done.acquire(timeout=timeout)
    finally:
        engine.stop()
    return out
