"""Optional LLM answer extractor for MathVista (off by default; recorded in run.json and per record).

It only extracts — it is asked to copy the final answer out of a response, never to solve or
grade — and it is called only when the deterministic extractor finds nothing.
"""

from __future__ import annotations

from phi4rv.client import ChatClient, ClientError

PROMPT = (
    "Below are a question and a model's response. Copy the final answer that the response gives, and "
    "nothing else: a number, an option letter, a short phrase or a list. If the response gives no final "
    "answer, reply NONE.\n\nQuestion: {question}\n\nResponse: {response}\n\nFinal answer:"
)


class LLMJudge:
    def __init__(self, endpoint: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        self.client = ChatClient(endpoint, api_key=api_key, timeout=timeout, retries=0)  # a failure: no answer
        self.name = f"{model} @ {self.client.endpoint}"
        self.model = model

    def __call__(self, question: str, response: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT.format(question=question, response=response)}],
            "temperature": 0,
            "max_tokens": 64,
        }
        try:
            text = self.client.complete(body).content.strip()
        except ClientError:
            return None
        return None if not text or text.upper().startswith("NONE") else text
