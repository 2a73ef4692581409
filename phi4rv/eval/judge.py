"""Optional LLM answer extractor for MathVista (off by default; recorded in run.json and per record).

It only extracts — it is asked to copy the final answer out of a response, never to solve or
grade — and it is called only when the deterministic extractor finds nothing.
"""

from __future__ import annotations

import httpx

PROMPT = (
    "Below are a question and a model's response. Copy the final answer that the response gives, and "
    "nothing else: a number, an option letter, a short phrase or a list. If the response gives no final "
    "answer, reply NONE.\n\nQuestion: {question}\n\nResponse: {response}\n\nFinal answer:"
)


class LLMJudge:
    def __init__(self, endpoint: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        endpoint = endpoint.rstrip("/")
        self.url = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
        self.name = f"{model} @ {endpoint}"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def __call__(self, question: str, response: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT.format(question=question, response=response)}],
            "temperature": 0,
            "max_tokens": 64,
        }
        try:
            r = self.client.post(self.url, json=body)
            r.raise_for_status()
            text = (r.json()["choices"][0]["message"].get("content") or "").strip()
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            return None
        return None if not text or text.upper().startswith("NONE") else text
