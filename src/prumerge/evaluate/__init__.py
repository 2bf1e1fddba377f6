"""``prumerge-export evaluate``: answer-level quality of built artifacts on a question file — accuracy, agreement
with the full-token answers, visual tokens, prefill and TTFT per configuration (method x artifact), LLaVA's
question and answer file formats, and choosing a configuration by a latency or accuracy budget.

Device side: it runs artifacts with the runtime (no torch), like ``run`` and ``profile``."""

from .budget import build_command, choose
from .questions import EvalQuestion, read_answers, read_questions
from .runner import Configuration, configurations, run, summarize

__all__ = ["EvalQuestion", "read_questions", "read_answers", "Configuration", "configurations", "run", "summarize",
           "choose", "build_command"]
