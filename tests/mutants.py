"""Re-make known bugs one at a time and check that the suite catches each (a developer tool, not collected by
pytest: ``python tests/mutants.py [NAME ...]``).

Each mutant is one textual change to one source file and the test files that must fail on it. The file is
restored afterwards whatever happens. A mutant that survives is printed as SURVIVED and the exit code is 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "prumerge"

# name: (file, original text, mutated text, tests that must catch it)
MUTANTS = {
    "fp16 selection rule ignores the kept order": (
        "export/validate.py", "if np.any(kept_scores * high < later_max * low):", "if False:",
        ["tests/test_checkpoints.py::test_selection_rule_allows_only_what_the_reference_scores_allow"]),
    "fp16 selection rule ignores the threshold": (
        "export/validate.py", "if highest_other * low > threshold * high:", "if False:",
        ["tests/test_checkpoints.py::test_selection_rule_allows_only_what_the_reference_scores_allow"]),
    "merge leaves out the kept patch itself": (
        "reduce/merge.py", "rows.scatter_(-1, slots.unsqueeze(-1), own.unsqueeze(-1))", "pass",
        ["tests/test_reduce.py::test_matches_loop_reference_at_batch_one"]),
    "llm files not hashed": (
        "artifact/manifest.py", 'if sha256_file(path) != meta["sha256"]:',
        'if not name.startswith("llm/") and sha256_file(path) != meta["sha256"]:',
        ["tests/test_pipeline.py::test_every_file_of_the_llm_is_verified"]),
    "no validation gate": (
        "export/validate.py", "def require(result: ValidationResult, what: str) -> ValidationResult:\n",
        "def require(result: ValidationResult, what: str) -> ValidationResult:\n    return result\n",
        ["tests/test_checkpoints.py::test_a_graph_that_disagrees_with_pytorch_fails_the_build"]),
    "images in reverse order": (
        "runtime/pipeline.py", "parts = [visual[value] if kind",
        "visual = visual[::-1]\n            parts = [visual[value] if kind",
        ["tests/test_pipeline.py::test_each_image_lands_where_its_marker_is"]),
    "normalized merge drops the kept token's weight": (
        "reduce/merge.py", "own = scores.gather(-1, slots) if normalized else torch.ones_like(slots, dtype=scores.dtype)",
        "own = torch.ones_like(slots, dtype=scores.dtype)",
        ["tests/test_reduce.py::test_options_off_their_defaults_match_the_loop_reference"]),
    "sampling always takes the top token": (
        "runtime/llm.py", "return int(rng.choice(keep, p=chosen))", "return int(keep[0])",
        ["tests/test_pipeline.py::test_nucleus_sampling_draws_from_the_nucleus_in_proportion"]),
    "BOS dropped": (
        "runtime/pipeline.py", '[(self.spec["bos_token_id"], None)] if self.spec.get("add_bos") else []', "[]",
        ["tests/test_bad_input.py::test_bos_is_prepended_when_the_model_wants_it"]),
    "transparent pixels black": (
        "runtime/preprocess.py", "    if pil.mode == \"RGB\":\n        return pil\n",
        "    return pil.convert(\"RGB\")\n",
        ["tests/test_preprocess.py", "tests/test_bad_input.py::test_transparent_pixels_become_white_as_in_transformers"]),
    "user text parsed for special tokens": (
        "runtime/pipeline.py", "plain.encode_special_tokens = True", "plain.encode_special_tokens = False",
        ["tests/test_bad_input.py::test_special_tokens_typed_by_a_user_stay_text"]),
    "manifest paths not confined": (
        "artifact/manifest.py", "    pure = PurePosixPath(name)\n", "    return Path(directory) / name\n",
        ["tests/test_bad_input.py::test_manifest_paths_cannot_leave_the_artifact"]),
    "--force deletes anything": (
        "export/staging.py", "    if not any(target.iterdir()):\n        return True\n", "    return True\n",
        ["tests/test_bad_input.py::test_force_never_deletes_what_is_not_an_artifact"]),
    "ties broken arbitrarily": (
        "reduce/ranking.py", "    if tracing():\n", "    if True:\n",
        ["tests/test_checkpoints.py::test_exact_ties_pick_the_lowest_patch_index_in_torch_and_onnxruntime"]),
    "near-ties never checked": (
        "export/validate.py", "tie = np.zeros(len(rows), dtype=bool) if gaps is None else np.asarray(gaps[b])[rows] < epsilon",
        "tie = np.ones(len(rows), dtype=bool)",
        ["tests/test_checkpoints.py::test_per_token_validation_explains_only_near_ties"]),
}


def run(name: str) -> bool:
    file, original, mutated, tests = MUTANTS[name]
    path = SRC / file
    text = path.read_text()
    if text.count(original) != 1:
        print(f"STALE     {name}: the original text is not found once in {file}; update tests/mutants.py")
        return False
    path.write_text(text.replace(original, mutated))
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(text)
    caught = result.returncode == 1
    print(f"{'caught   ' if caught else 'SURVIVED '} {name}" + ("" if caught else f" (pytest exit {result.returncode})"))
    return caught


def main(names) -> int:
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        print(f"unknown mutant(s): {', '.join(unknown)}; known: {', '.join(MUTANTS)}")
        return 2
    results = [run(name) for name in (names or MUTANTS)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
