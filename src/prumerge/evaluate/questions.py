"""LLaVA's question file in, LLaVA's answer file out, so LLaVA's and lmms-eval's scorers read what evaluate writes.

Question file (JSON lines, as LLaVA's ``model_vqa_loader`` reads): ``question_id``, ``image`` (a path relative to
the image folder), ``text`` (the question), and optionally ``answer`` (a string, or a list for VQAv2-style
annotators) and ``category``. Answer file (as LLaVA's ``model_vqa`` writes): ``question_id``, ``prompt``, ``text``,
``answer_id``, ``model_id``, ``metadata``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..artifact.manifest import sha256_file
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
        except RecursionError:
            raise InputError(f"{where}: not a question (JSON nested too deeply to read)") from None
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
        if not isinstance(image, str) or not image or "\0" in image:
            raise InputError(f"{where}: image must be a file name inside {folder}")
        try:
            file = (folder / image).resolve()
            found = file.is_file()
        except (OSError, ValueError) as exc:  # a name too long, or one the system cannot take
            raise InputError(f"{where}: image {image[:80]!r} cannot be opened ({exc})") from None
        if root not in file.parents:
            raise InputError(f"{where}: image {image!r} is outside the image folder {folder}")
        if not found:
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


def _record_problem(record) -> str | None:
    """What makes ``record`` something other than an answer evaluate wrote (None when it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    qid = record.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        return "question_id is missing or not a string"
    if not isinstance(record.get("text"), str):
        return "text (the answer) is missing or not a string"
    if not isinstance(record.get("metadata"), dict):
        return "metadata is missing or not an object"
    return None


def _parse(line: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None


def read_answers(path: Path, artifact_sha256: str) -> dict:
    """``{question_id: answer record}`` already in an answer file (an interrupted run resumes from them; for an id
    answered twice, the later record).

    Everything is checked before anything is touched: a link or a non-file at the answer path, a line that is not
    an answer record (named by file and line), or answers written for another artifact are refused, and the file
    is left as it was. Only then is a last line cut short by an interruption dropped (the file truncated to its
    last whole line) — and only when it is the start of a record, in a file whose other lines are records."""
    if path.is_symlink():
        raise InputError(f"{path} is a link; evaluate never writes through links in --out: move it away")
    if not path.exists():
        return {}
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; evaluate keeps its answers there: move it away")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror})") from None
    whole, tail = raw[: raw.rfind(b"\n") + 1], raw[raw.rfind(b"\n") + 1:]
    answers = {}
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        record = _parse(line)
        problem = "not JSON" if record is None else _record_problem(record)
        if problem:
            raise InputError(f"{path}:{number} is not an answer record written by evaluate ({problem}); "
                             "move the file away or use another --out")
        if record["metadata"].get("artifact_sha256") != artifact_sha256:
            raise InputError(f"{path} holds answers from another artifact (manifest {str(record['metadata'].get('artifact_sha256'))[:12]}…); "
                             "use another --out or remove it")
        answers[str(record["question_id"])] = record
    if tail:  # every whole line is a record (checked above): a cut last line must be the start of one
        if not tail.startswith(b'{"question_id"'):
            raise InputError(f"{path}: its last line is not an answer record written by evaluate; "
                             "move the file away or use another --out")
        with open_answers(path, mode=os.O_RDWR) as handle:
            handle.truncate(len(whole))
    return answers


def open_answers(path: Path, mode: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT):
    """The answer file opened without following a link (a link planted at the answer path is refused, never
    written through)."""
    try:
        fd = os.open(path, mode | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise InputError(f"{path} cannot be opened for answers ({exc.strerror})") from None
    return os.fdopen(fd, "r+b" if mode & os.O_RDWR else "a", **({} if mode & os.O_RDWR else {"encoding": "utf-8"}))


LOCK_FILE = ".evaluate.lock"


@contextlib.contextmanager
def answers_lock(out: Path):
    """Hold ``out`` for this run alone: a second evaluate on the same ``--out`` would answer every question again
    into the same files. Refused in one line while another run holds it (the lock goes with the process)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks here: nothing to hold
        yield
        return
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot take its lock ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another evaluate is writing answers in {out}; wait for it or use another --out") from None
        yield
    finally:
        os.close(fd)


_IMAGE_HASHES: dict = {}


def question_key(question: EvalQuestion, max_new_tokens: int) -> str:
    """What an answer depends on: the question's text, its image's bytes and the generation settings. An answer
    file's record is reused only for the same key."""
    stat = question.image.stat()
    cache = (str(question.image), stat.st_size, stat.st_mtime_ns)
    if cache not in _IMAGE_HASHES:
        _IMAGE_HASHES[cache] = sha256_file(question.image)
    text = json.dumps([question.text, _IMAGE_HASHES[cache], int(max_new_tokens)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]
