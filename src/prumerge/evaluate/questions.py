"""LLaVA's question file in, LLaVA's answer file out, so LLaVA's and lmms-eval's scorers read what evaluate writes.

Question file (JSON lines, as LLaVA's ``model_vqa_loader`` reads): ``question_id``, ``image`` (a path relative to
the image folder), ``text`` (the question), and optionally ``answer`` (a string, or a list for VQAv2-style
annotators) and ``category``. Answer file (as LLaVA's ``model_vqa`` writes): ``question_id``, ``prompt``, ``text``,
``answer_id``, ``model_id``, ``metadata``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import InputError

MAX_QUESTIONS = 1_000_000


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    question_id: str
    image: Path
    text: str
    answer: object = None  # str, list of str, or None (unscored)
    category: str | None = None


def read_questions(path: str | os.PathLike, images: str | os.PathLike | None = None) -> list:
    """Parse and check a question file; image paths resolve inside ``images`` (default: the file's folder).

    Every problem is one :class:`InputError` naming the line: a question without an id, text or image, a duplicate
    id, an image path leaving the folder, or an image that does not exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"question file {path} does not exist")
    folder = Path(images) if images is not None else path.parent
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist")
    root = folder.resolve()
    questions, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: not a JSON object")
        qid = item.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
            raise InputError(f"{where}: question_id must be a string or an integer")
        qid = str(qid)
        if qid in seen:
            raise InputError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        text, image = item.get("text"), item.get("image")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: text (the question) must be a non-empty string")
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: image must be a file name inside {folder}")
        file = (folder / image).resolve()
        if root not in file.parents:
            raise InputError(f"{where}: image {image!r} is outside the image folder {folder}")
        if not file.is_file():
            raise InputError(f"{where}: image {image!r} not found in {folder}")
        answer = item.get("answer")
        if answer is not None and not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                                                   and all(isinstance(a, str) for a in answer))):
            raise InputError(f"{where}: answer must be a string or a non-empty list of strings")
        category = item.get("category")
        questions.append(EvalQuestion(qid, file, text, answer, None if category is None else str(category)))
        if len(questions) > MAX_QUESTIONS:
            raise InputError(f"{path} has more than {MAX_QUESTIONS} questions")
    if not questions:
        raise InputError(f"{path} has no questions")
    return questions


def read_answers(path: Path, artifact_sha256: str) -> dict:
    """``{question_id: answer record}`` already in an answer file (an interrupted run resumes from them).

    A last line cut short by an interruption is dropped (the file is truncated to its last whole line); records
    written for another artifact are refused rather than mixed in."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    if len(whole) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(whole))
    answers = {}
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            qid, meta = str(record["question_id"]), record["metadata"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{number} is not an answer record written by evaluate; move the file away") from None
        if meta.get("artifact_sha256") != artifact_sha256:
            raise InputError(f"{path} holds answers from another artifact (manifest {str(meta.get('artifact_sha256'))[:12]}…); "
                             "use another --out or remove it")
        answers[qid] = record
    return answers
