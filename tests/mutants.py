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
    "the mixed cache's prefill quantises by truncation, not rounding": (
        "export/kv_cache.py", 'helper.make_node("Round", [f"{tag}/{which}_scaled"], [f"{tag}/{which}_rounded"]),',
        'helper.make_node("Identity", [f"{tag}/{which}_scaled"], [f"{tag}/{which}_rounded"]),',
        ["tests/test_pipeline.py::test_a_mixed_kv_cache_prefills_in_float_and_decodes_from_the_int8_cache"]),
    "a mixed decoder prefills on the int8 kernel": (
        "runtime/llm.py", "if self.prefill_switch and cache.length == 0:", "if False:",
        ["tests/test_pipeline.py::test_a_mixed_kv_cache_prefills_in_float_and_decodes_from_the_int8_cache"]),
    "the question reaches CLIP's text model without its start and end tokens": (
        "runtime/text.py", "ids = self.tokenizer.encode(text).ids", "ids = self.tokenizer.encode(text, add_special_tokens=False).ids",
        ["tests/test_cdpruner.py::test_the_clip_text_relevance_keeps_what_the_released_code_keeps"]),
    "CLIP's image head skips post_layernorm": (
        "model/text_relevance.py", "nn.functional.linear(self.post_layernorm(patches).float(),",
        "nn.functional.linear(patches.float(),",
        ["tests/test_cdpruner.py::test_the_clip_text_relevance_keeps_what_the_released_code_keeps"]),
    "a CLIP whose vision weights are not the tower's is taken": (
        "model/text_relevance.py", "    if differing:\n", "    if False:\n",
        ["tests/test_cdpruner.py::test_a_text_encoder_that_is_not_the_towers_clip_or_not_for_cdpruner_is_refused"]),
    "a text encoder keeps the LLM-space sign by default": (
        "export/options.py", 'reducer["relevance_sign"] = "negated"', "pass",
        ["tests/test_cdpruner.py::test_the_clip_text_relevance_keeps_what_the_released_code_keeps"]),
    "a second question runs the tower again": (
        "runtime/pipeline.py", "patches = self._towers.pop(key, None)", "patches = self._towers.pop(key, None) and None",
        ["tests/test_cdpruner.py::test_a_second_question_on_an_image_runs_the_reducer_graph_alone"]),
    "the engine profile gives the question rows the batch's range": (
        "export/tensorrt.py", "QUESTION_ROWS_AXIS: (1, options.opt_question_rows, options.max_question_rows)}",
        "QUESTION_ROWS_AXIS: (options.min_batch, options.opt_batch, options.max_batch)}",
        ["tests/test_cdpruner.py::test_a_tensorrt_engine_for_a_question_graph_profiles_the_question_rows_and_refuses_longer_ones"]),
    "a question longer than the engine's profile reaches TensorRT": (
        "runtime/session.py", "if self.question_rows_max is not None and embeds.shape[1] > self.question_rows_max:", "if False:",
        ["tests/test_cdpruner.py::test_a_tensorrt_engine_for_a_question_graph_profiles_the_question_rows_and_refuses_longer_ones"]),
    "Triton's entry model sends no question": (
        "triton/models/bls_model.py", "        if self.questions is not None:  # the reducer keeps", "        if False:  # the reducer keeps",
        ["tests/test_triton.py::test_the_entry_model_passes_the_question_to_a_question_reading_graph"]),
    "a stop whose exit was dropped still publishes the build": (
        "export/staging.py", "stop_if_requested()  # a signal whose exit was dropped: nothing is published", "pass",
        ["tests/test_bad_input.py::test_a_stop_whose_exit_was_dropped_still_publishes_nothing"]),
    "INT8 calibration of a question-reading graph feeds no question": (
        "calib/int8.py", "extra = probe_question(1, question_width) if question_width else {}", "extra = {}",
        ["tests/test_cdpruner.py::test_int8_and_the_int8_kv_cache_calibrate_with_the_probe_question_and_keep_the_reducer_float"]),
    "validation takes any moved CDPruner set as a near-tie": (
        "reduce/methods/cdpruner.py", "allowed = allowed or (len(top) > 1 and float(top[0] - top[1]) < NEAR_TIE * scale)",
        "allowed = True",
        ["tests/test_cdpruner.py::test_validation_allows_a_set_only_where_the_reference_greedy_step_was_a_near_tie"]),
    "cdpruner's relevance reads the question's padding rows": (
        "reduce/methods/cdpruner.py", "weight = mask.to(cosine.dtype).unsqueeze(1)",
        "weight = torch.ones_like(mask).to(cosine.dtype).unsqueeze(1)",
        ["tests/test_cdpruner.py::test_padding_rows_of_the_question_change_nothing"]),
    "cdpruner's greedy step forgets the rows written before": (
        "reduce/methods/cdpruner.py", "row = row - torch.matmul(at_pick.transpose(1, 2), rows)", "row = row",
        ["tests/test_cdpruner.py::test_matches_the_released_selection_at_batch_one"]),
    "a graph that reads the question runs without one": (
        "runtime/session.py", 'raise InputError(f"this vision graph\'s reducer reads the question: give {\' and \'.join(QUESTION_INPUTS)}")',
        "return {}",
        ["tests/test_cdpruner.py::test_the_graph_keeps_what_pytorch_keeps_for_each_question_and_verify_passes"]),
    "the pipeline does not embed the question": (
        "runtime/pipeline.py", "question = self.question(prompt, len(images)) if self.vision.needs_question else None",
        "question = None",
        ["tests/test_cdpruner.py::test_the_pipeline_embeds_the_question_and_answers"]),
    "a manifest's question inputs are not checked": (
        "artifact/sections.py", "if names[0] != INPUT_NAME or names[1:] not in ((), QUESTION_INPUTS):", "if False:",
        ["tests/test_cdpruner.py::test_a_manifest_whose_question_inputs_are_renamed_or_dropped_is_refused"]),
    "profile's KV cache figure counts one of keys and values": (
        "latency/memory.py", "llm.num_layers * 2 * llm.num_kv_heads", "llm.num_layers * llm.num_kv_heads",
        ["tests/test_profile.py::test_memory_figures_are_the_artifacts_files_and_the_decoders_geometry"]),
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
        "runtime/pipeline.py", "parts = [visual[c.image] if c.kind",
        "visual = visual[::-1]\n            parts = [visual[c.image] if c.kind",
        ["tests/test_pipeline.py::test_each_image_lands_where_its_marker_is"]),
    "normalized merge drops the kept token's weight": (
        "reduce/merge.py", "own = scores.gather(-1, slots) if normalized else torch.ones_like(slots, dtype=scores.dtype)",
        "own = torch.ones_like(slots, dtype=scores.dtype)",
        ["tests/test_reduce.py::test_options_off_their_defaults_match_the_loop_reference"]),
    "sampling always takes the top token": (
        "runtime/llm.py", "return int(rng.choice(keep, p=chosen))", "return int(keep[0])",
        ["tests/test_pipeline.py::test_nucleus_sampling_draws_from_the_nucleus_in_proportion"]),
    "BOS dropped": (
        "runtime/pipeline.py", '[(self.spec.bos_token_id, None)] if self.spec.add_bos else []', "[]",
        ["tests/test_bad_input.py::test_bos_is_prepended_when_the_model_wants_it"]),
    "transparent pixels black": (
        "runtime/preprocess.py", "    if pil.mode == \"RGB\":\n        return pil\n",
        "    return pil.convert(\"RGB\")\n",
        ["tests/test_preprocess.py", "tests/test_bad_input.py::test_transparent_pixels_become_white_as_in_transformers"]),
    "user text parsed for special tokens": (
        "runtime/llm.py", "plain.encode_special_tokens = True", "plain.encode_special_tokens = False",
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
    "answers of another artifact resumed": (
        "evaluate/questions.py", 'if record["metadata"].get("artifact_sha256") != artifact_sha256:', "if False:",
        ["tests/test_evaluate.py::test_an_interrupted_answer_file_resumes_from_its_whole_lines"]),
    "question images may leave their folder": (
        "evaluate/questions.py", "if root not in file.parents:", "if False:",
        ["tests/test_evaluate.py::test_bad_question_files_are_one_error_naming_the_line"]),
    "POPE's 'not' read as yes": (
        "evaluate/scoring.py", 'return "no" if {"no", "not"} & set(first.split()) else "yes"',
        'return "no" if {"no"} & set(first.split()) else "yes"',
        ["tests/test_evaluate.py::test_scores_as_vqa_pope_and_multiple_choice_scorers_do"]),
    "budget picks the slowest that keeps the accuracy": (
        "evaluate/budget.py", 'return min(fits, key=lambda r: (r["ttft_ms"]["p50"], -r["accuracy"]))',
        'return max(fits, key=lambda r: (r["ttft_ms"]["p50"], -r["accuracy"]))',
        ["tests/test_evaluate.py::test_choose_by_budget"]),
    "DINOv2 tower keys in the released layout not renamed": (
        "model/towers.py", "    if not layouts:\n        return state\n",
        "    return state\n",
        ["tests/test_demovlm.py::test_llava_with_a_dinov2_tower_loads_as_transformers_runs_it"]),
    "LoRA merged without its scale": (
        "demovlm/lora.py", 'delta = float(state[f"{name}.scale"]) * state', "delta = state",
        ["tests/test_demovlm.py::test_lora_merge_equals_the_adapter_forward"]),
    "size question names an object by a shape it shares": (
        "shapes_qa.py", "pairs = [(a, b) for a in unique_shape for b in unique_shape if a.radius > 1.6 * b.radius]",
        "pairs = [(a, b) for a in nameable for b in nameable if a is not b and a.radius > 1.6 * b.radius and a.shape != b.shape]",
        ["tests/test_shapes_qa.py::test_every_answer_is_right_and_unambiguous"]),
    "--force replace leaves a window with nothing at --out": (
        "export/staging.py", "if exchange(staging, target):", "if False:",
        ["tests/test_bad_input.py::test_an_interrupted_replace_is_restored_never_deleted"]),
    "an interrupted replace's old directory is deleted, not restored": (
        "export/staging.py", 'if kind == "old" and not os.path.lexists(target)', 'if False and kind == "old"',
        ["tests/test_bad_input.py::test_an_interrupted_replace_is_restored_never_deleted"]),
    "the lock follows a symlink": (
        "export/staging.py", "os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW", "os.O_RDWR | os.O_CREAT",
        ["tests/test_bad_input.py::test_the_lock_never_writes_through_a_link"]),
    "--out may overlap an input": (
        "export/staging.py", "if path == target or path in target.parents or target in path.parents:", "if False:",
        ["tests/test_bad_input.py::test_force_never_replaces_an_input_or_another_commands_output"]),
    "--force replaces another command's output": (
        "export/staging.py", 'return found == kind or (found == "legacy" and kind != "artifact")', "return found is not None",
        ["tests/test_bad_input.py::test_force_never_replaces_an_input_or_another_commands_output"]),
    "resize output unbounded": (
        "runtime/preprocess.py", "if config.resize_shortest_edge * new_long > MAX_STEP_PIXELS:", "if False:",
        ["tests/test_bad_input.py::test_a_tiny_png_that_would_resize_to_gigabytes_is_refused_before_any_allocation"]),
    "EXIF orientation ignored": (
        "runtime/preprocess.py", "        pil = _upright(pil)\n", "        pass\n",
        ["tests/test_bad_input.py::test_exif_orientation_is_applied_as_transformers_does"]),
    "external data not checked against the manifest": (
        "artifact/manifest.py", "        self._check_external_data(directory)\n", "",
        ["tests/test_bad_input.py::test_external_data_the_manifest_does_not_hash_is_refused_even_when_pinned"]),
    "stream shows the start of a stop string": (
        "runtime/pipeline.py", "safe = text if hit is not None else text[: len(text) - _stop_prefix(text, stop)]", "safe = text",
        ["tests/test_pipeline.py::test_counts_timings_streaming_and_stops"]),
    "relative mm_vision_tower read from the working directory": (
        "export/convert.py", 'tower_source = vision_tower or _tower_location(source, config["mm_vision_tower"])',
        'tower_source = vision_tower or config["mm_vision_tower"]',
        ["tests/test_checkpoints.py::test_a_relative_tower_path_resolves_against_the_checkpoint_never_the_working_directory"]),
    "0600 files kept": (
        "export/staging.py", "                _apply_umask(staging)\n", "",
        ["tests/test_bad_input.py::test_artifacts_are_readable_by_others_under_the_usual_umask"]),
    "--image-size 0 taken as not given": (
        "model/encoder.py", "int(image_size if image_size is not None else tower.config.image_size)",
        "int(image_size or tower.config.image_size)",
        ["tests/test_bad_input.py::test_sizes_and_counts_are_bounded_up_front"]),
    "fp16 logits divided by a tiny temperature": (
        "runtime/llm.py", "    logits = np.asarray(logits, dtype=np.float64)", "    pass",
        ["tests/test_bad_input.py::test_tiny_temperatures_and_negative_seeds"]),
    "opsets the exporter lacks accepted": (
        "export/graph.py", "not 18 <= opset <= max_opset()", "not 18 <= opset",
        ["tests/test_bad_input.py::test_command_arguments_are_one_line_before_any_work"]),
    "calibration capacity of any type": (
        "calib/budget.py", 'isinstance(m, dict) and _positive_int(m.get("capacity"))', 'isinstance(m, dict) and "capacity" in m',
        ["tests/test_bad_input.py::test_calibration_numbers_are_checked_when_read"]),
    "a wrong-shaped tower weight is torch's traceback": (
        "model/encoder.py", '    _check_shapes(tower, state, source, "vision tower")\n', "",
        ["tests/test_bad_input.py::test_a_vision_weight_of_the_wrong_shape_names_the_tensor"]),
    "no network read as a missing hub file": (
        "model/checkpoint.py", "except LocalEntryNotFoundError:", "except ZeroDivisionError:",
        ["tests/test_bad_input.py::test_no_network_is_told_from_a_missing_file"]),
    "fp32 order among near-tied kept patches held exact": (
        "export/validate.py", 'if reducer.method.value not in ADAPTIVE_METHODS or reducer.order.value != "official":',
        'if reducer.method.value not in ADAPTIVE_METHODS or reducer.order.value != "official" or SELECTION_EPSILON[precision] <= 0:',
        ["tests/test_checkpoints.py::test_fp32_allows_only_an_order_swap_among_near_tied_kept_patches"]),
    "a linked manifest read": (
        "artifact/manifest.py", "        if path.is_symlink():\n", "        if False:\n",
        ["tests/test_bad_input.py::test_a_linked_manifest_is_refused"]),
    "manifest numbers trusted": (
        "artifact/fields.py", "        section.check(where)\n", "",
        ["tests/test_bad_input.py::test_manifest_numbers_and_templates_are_checked_when_read"]),
    "graph I/O not compared with the manifest": (
        "runtime/vision.py", "        _check_io(session, spec, directory)\n", "",
        ["tests/test_bad_input.py::test_the_graph_must_be_what_the_manifest_says"]),
    "verify --images unbounded": (
        "export/verify.py", "not 1 <= images <= MAX_VERIFY_IMAGES:", "not isinstance(images, int):",
        ["tests/test_bad_input.py::test_sizes_and_counts_are_bounded_up_front"]),
    "calibrate --out checked after the model pass": (
        "cli.py", '    _outputs(("--out", out), ("--histogram", histogram), ("--report-json", report_json), pictures=("--histogram",),',
        '    _outputs(("--histogram", histogram), ("--report-json", report_json), pictures=("--histogram",),',
        ["tests/test_bad_input.py::test_command_arguments_are_one_line_before_any_work"]),
    "entry model does not pass a leaving client on to the decode": (
        "triton/models/bls_model.py", "                self.cancels.cancel(key)\n", "",
        ["tests/test_triton.py::test_a_client_leaving_mid_stream_stops_its_decode"]),
    "cancel keys not checked before they name a path": (
        "triton/cancel.py", "if isinstance(key, str) and _KEY.fullmatch(key) else None", "if key else None",
        ["tests/test_triton.py::test_cancel_board_keys_never_leave_the_board"]),
    "visionzip averages the target into its contextual token": (
        "reduce/visionzip.py", "contextual_x = rows(plan.targets) + torch.matmul(one_hot.transpose(1, 2), rows(plan.merged)) / counts",
        "contextual_x = (rows(plan.targets) + torch.matmul(one_hot.transpose(1, 2), rows(plan.merged))) / (counts + 1)",
        ["tests/test_visionzip_divprune.py::test_visionzip_matches_the_official_code_on_a_clip_tower"]),
    "visionzip scores with the last layer": (
        "model/encoder.py", "            self.scoring_layer = self.feature_index - 1\n", "",
        ["tests/test_visionzip_divprune.py::test_visionzip_matches_the_official_code_on_a_clip_tower"]),
    "divprune's first pick counts a token's distance to itself": (
        "reduce/divprune.py", "largest=False).values[:, 1, :]", "largest=False).values[:, 0, :]",
        ["tests/test_visionzip_divprune.py::test_divprune_on_duplicates_and_flat_features_picks_as_the_official_code"]),
    "the encoder's call of a registered reducer not attributed to the reducer": (
        "artifact/node_stages.py", 'REDUCER_CALL = "spec.run("', 'REDUCER_CALL = "reducer_function("',
        ["tests/test_registry.py::test_the_encoder_calls_every_method_by_the_line_node_stages_attributes"]),
    "a method's fixed count taken from the wrong option": (
        "reduce/methods/divprune.py", "count=lambda config, num_patches: config.diverse_tokens",
        "count=lambda config, num_patches: config.diverse_tokens + 1",
        ["tests/test_visionzip_divprune.py"]),
    "a reducer option's lower bound not checked": (
        "reduce/registry.py", "if isinstance(value, bool) or not isinstance(value, int) or (self.minimum is not None and value < self.minimum):",
        "if isinstance(value, bool) or not isinstance(value, int):",
        ["tests/test_registry.py::test_options_are_declared_once_and_checked_from_their_declaration"]),
    "build_command drops a reducer option": (
        "evaluate/budget.py", "if name in declared and (value != defaults[name] or name in stated):",
        "if name in declared and (value != defaults[name] or name in stated) and name != \"iqr_factor\":",
        ["tests/test_evaluate.py"]),
    "triton --max-batch 0 taken as not given": (
        "triton/repository.py", "int(options.max_batch if options.max_batch is not None else vision.batch_max)",
        "int(options.max_batch or vision.batch_max)",
        ["tests/test_bad_input.py::test_command_arguments_are_one_line_before_any_work"]),
    "one stop string taken as a list of its characters": (
        "runtime/pipeline.py", "if isinstance(self.stop, str):  # one string", "if False:  # one string",
        ["tests/test_bad_input.py::test_prompt_and_sampling_values_are_checked"]),
    "alignment labels patches whose centre is off the object": (
        "demovlm/data.py", "out[p] = label if centre[p] and share[p] >= 0.5 else -1", "out[p] = label",
        ["tests/test_demovlm.py::test_patch_labels_name_the_colour_drawn_under_each_patch"]),
    "INT8 build options without a calibration file accepted": (
        "export/options.py", "if self.int8 is not None and not self.calibration:", "if False:",
        ["tests/test_build_options.py"]),
    "a side asked of (and aligned for) an object in the middle": (
        "shapes_qa.py", "return None if abs(self.cx - size / 2) <= size * POSITION_MARGIN else", "return None if False else",
        ["tests/test_shapes_qa.py::test_every_answer_is_right_and_unambiguous",
         "tests/test_demovlm.py::test_patch_labels_name_the_colour_drawn_under_each_patch"]),
    "verify rebuilds its reference by converting the whole original-layout checkpoint": (
        "export/reference.py", "vision_only=True) as (checkpoint, _):", "vision_only=False) as (checkpoint, _):",
        ["tests/test_checkpoints.py::test_build_takes_an_original_layout_lora_checkpoint_directly"]),
    "decoder cache names not checked against the layer count": (
        "artifact/fields.py", "if not isinstance(names, list) or len(names) != layers or", "if not isinstance(names, list) or",
        ["tests/test_bad_input.py::test_manifest_numbers_and_templates_are_checked_when_read"]),
    "a zero normalisation std accepted from a manifest": (
        "artifact/sections.py", "if not all(config.image_std) or not", "if not",
        ["tests/test_bad_input.py::test_manifest_numbers_and_templates_are_checked_when_read"]),
    "stale cleanup globs the target's name unescaped": (
        "export/staging.py", 'target.parent.glob(glob.escape(prefix) + "*")', 'target.parent.glob(prefix + "*")',
        ["tests/test_bad_input.py::test_stale_cleanup_takes_only_its_own_targets_leftovers"]),
    "op support's ok read from the file, not recomputed": (
        "artifact/graph_facts.py", "        self.ok = not self.unsupported and not self.violations\n", "        pass\n",
        ["tests/test_bad_input.py::test_recorded_facts_read_back_typed_and_derived_fields_are_recomputed"]),
    "INT8 agreement fractions not range-checked": (
        "artifact/graph_facts.py", '            _number(getattr(self, name), f"{where}.{name}", 0.0, 1.0)\n', "            pass\n",
        ["tests/test_bad_input.py::test_manifest_numbers_and_templates_are_checked_when_read"]),
    "a resumed run forgets the alignment's draws": (
        "demovlm/train.py", "    for _ in range(align_steps):\n        _align_images(rng, cache)\n", "",
        ["tests/test_demovlm.py::test_a_resumed_run_draws_the_batches_the_whole_run_would_have"]),
    "the LM head computes every position's logits again": (
        "export/llm.py", 'COMMON_BUILDER_OPTIONS = {"prune_lm_head": "true"}', "COMMON_BUILDER_OPTIONS = {}",
        ["tests/test_pipeline.py::test_kv_cache_decode_equals_full_recompute"]),
    "a shared-buffer step's mask spans the whole buffer": (
        "runtime/llm.py", "shared.mask[:, :total]", "shared.mask",
        ["tests/test_pipeline.py::test_kv_cache_decode_equals_full_recompute"]),
    "the cached SmolLM2 is handed out, not a copy": (
        "demovlm/smollm2.py", "return copy.deepcopy(model), tokenizer", "return model, tokenizer",
        ["tests/test_demovlm.py::test_the_language_model_is_a_fresh_copy_each_call"]),
    "an all-rows decoder's logits stay bound to the first step's shape": (
        "runtime/llm.py", '                shared.binding.bind_output(self.io.logits, "cpu")', "                pass",
        ["tests/test_pipeline.py::test_a_decoder_built_before_the_lm_head_was_pruned_still_generates"]),
    "the SmolLM2 cache reads an entry that never finished": (
        "demovlm/smollm2.py", "if (folder / _COMPLETE).is_file() and not untrusted(folder)", "if folder.is_dir() and not untrusted(folder)",
        ["tests/test_demovlm.py::test_the_gguf_conversion_is_kept_once_and_read_back_not_redone"]),
    "a continuation starts from the fp16 LoRA file": (
        "demovlm/train.py", 'lora = state["lora"] if state and state["lora"] else lora\n', "\n",
        ["tests/test_demovlm.py::test_a_continuation_starts_from_the_run_it_names_in_full_precision"]),
    "the parts a target Jaccard chose are quantised anyway": (
        "calib/int8.py", "excluded = float_nodes(fp32_path, float_layers, float_parts)",
        "excluded = float_nodes(fp32_path, float_layers)",
        ["tests/test_calib.py::test_int8_target_jaccard_build_records_its_choice_and_keeps_those_layers_float"]),
    "an onnxruntime too old for fused attention opens the graph anyway": (
        "runtime/vision.py", '        if spec.attention == "fused":\n            _require_fused_attention(directory)\n', "",
        ["tests/test_export.py::test_an_onnxruntime_too_old_for_fused_attention_is_told_to_rebuild"]),
    "an engine is built from a fused-attention graph": (
        "export/tensorrt.py", 'if manifest.vision.attention == "fused":', "if False:",
        ["tests/test_tensorrt.py::test_engine_without_tensorrt_is_one_clear_error"]),
    "a target Jaccard keeps the least harmful parts float": (
        "calib/sensitivity.py", "key=lambda part: (alone[part], position[part]))",
        "key=lambda part: (-alone[part], position[part]))",
        ["tests/test_calib.py::test_a_target_jaccard_keeps_the_fewest_most_harmful_parts_float"]),
    "int8 KV cache scales 10x too small (values clip)": (
        "export/kv_cache.py", "quantize_cache(model, path, keys / KV_QMAX, values / KV_QMAX)",
        "quantize_cache(model, path, keys / KV_QMAX / 10, values / KV_QMAX / 10)",
        ["tests/test_pipeline.py::test_an_int8_kv_cache_is_calibrated_written_and_decodes_like_the_float_one"]),
    "int8 KV cache keys scaled by their own range, not their rotary pair's": (
        "export/kv_cache.py", "    norm = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)  # pairs (i, i + D/2)\n    return np.concatenate([norm, norm], axis=-1)",
        "    return np.abs(keys)",
        ["tests/test_pipeline.py::test_the_rotary_envelope_bounds_a_key_at_every_position"]),
    "int8 KV cache calibrated without the visual tokens": (
        "export/kv_cache.py", "text = question if tokens is None else", "tokens = None\n        text = question if tokens is None else",
        ["tests/test_pipeline.py::test_an_int8_kv_cache_is_calibrated_written_and_decodes_like_the_float_one"]),
    "a template's rendering reused for other special tokens": (
        "export/llm.py", "key = json.dumps([tokenizer.chat_template, tokenizer.special_tokens_map], sort_keys=True, default=str)",
        "key = json.dumps([tokenizer.chat_template], sort_keys=True, default=str)",
        ["tests/test_bad_input.py::test_a_template_renders_once_per_process_and_a_changed_one_again"]),
    "an output may be one of the command's inputs": (
        "outputs.py", "    if target in read:\n", "    if False:\n",
        ["tests/test_hostile_outputs.py::test_evaluate_refuses_every_output_onto_an_input_or_into_an_artifact"]),
    "an output may land inside an artifact": (
        "outputs.py", "    if artifact is not None:\n", "    if False:\n",
        ["tests/test_hostile_outputs.py::test_evaluate_refuses_every_output_onto_an_input_or_into_an_artifact"]),
    "a picture of any suffix is accepted until the run ends": (
        "outputs.py", "if flag in pictures and path.suffix.lower() not in PICTURE_SUFFIXES:", "if False:",
        ["tests/test_hostile_outputs.py::test_evaluate_refuses_every_output_onto_an_input_or_into_an_artifact"]),
    "a budget that cannot choose is refused only after the run": (
        "cli.py", "    budget.check_request(ttft_budget_ms, min_accuracy_ratio, [c.method for c in configs])  # before any answer\n", "",
        ["tests/test_hostile_outputs.py::test_budgets_that_cannot_choose_are_refused_before_any_answer"]),
    "an answer file is truncated before it is checked": (
        "evaluate/questions.py", "        if not tail.startswith(b'{\"question_id\"'):", "        if False:",
        ["tests/test_hostile_outputs.py::test_a_file_evaluate_did_not_write_is_refused_and_left_as_it_was"]),
    "a damaged answer line is a traceback": (
        "evaluate/questions.py", '        problem = "not JSON" if record is None else _record_problem(record)', "        problem = None",
        ["tests/test_hostile_outputs.py::test_damaged_lines_are_one_error_naming_file_and_line"]),
    "answers are written through a link": (
        "evaluate/questions.py", "    if path.is_symlink():\n        raise", "    if False:\n        raise",
        ["tests/test_hostile_outputs.py::test_answer_files_are_never_written_through_a_link"]),
    "two evaluate runs write one answer folder": (
        "evaluate/questions.py", "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass",
        ["tests/test_hostile_outputs.py::test_one_evaluate_at_a_time_per_answer_folder"]),
    "answers are reused by question id alone": (
        "evaluate/runner.py", "done = {qid: r for qid, r in done.items() if r[\"metadata\"].get(\"question_key\") == keys.get(qid)}",
        "pass",
        ["tests/test_hostile_outputs.py::test_evaluate_answers_again_when_the_question_behind_an_id_changed"]),
    "an answer is not tied to its image": (
        "evaluate/questions.py", "text = json.dumps([question.text, _IMAGE_HASHES[cache], int(max_new_tokens)])",
        "text = json.dumps([question.text, int(max_new_tokens)])",
        ["tests/test_hostile_outputs.py::test_an_answer_is_tied_to_its_question_text_image_and_settings"]),
    "two labels share an answer file": (
        "evaluate/runner.py", 'c if (c.isascii() and c.isalnum()) or c in "-." else f"_{ord(c):x}_"',
        'c if c.isalnum() or c in "-._" else "_"',
        ["tests/test_hostile_outputs.py::test_answer_file_names_are_injective"]),
    "x full printed against a reference at chance": (
        "evaluate/runner.py", "    if full[\"accuracy\"] < chance + RATIO_MIN_MARGIN:", "    if False:",
        ["tests/test_evaluate.py::test_x_full_is_withheld_where_the_full_token_answers_are_near_chance_or_few"]),
    "a ratio withheld still chooses": (
        "evaluate/budget.py", "    if min_accuracy_ratio is not None and withheld:", "    if False:",
        ["tests/test_evaluate.py::test_x_full_is_withheld_where_the_full_token_answers_are_near_chance_or_few"]),
    "a flag for INT8 is ignored on a float build": (
        "export/options.py", "              if given and overrides.get(\"precision\") != \"int8\"]", "              if False]",
        ["tests/test_hostile_outputs.py::test_options_a_build_would_ignore_or_cannot_honour_are_refused_in_one_line"]),
    "NaN passes as a Jaccard": (
        "cli.py", "        if not math.isfinite(number):", "        if False:",
        ["tests/test_hostile_outputs.py::test_options_a_build_would_ignore_or_cannot_honour_are_refused_in_one_line"]),
    "a fused-attention graph gets a TensorRT script": (
        "export/options.py", "if self.engine is not None and self.graph.opset > PLAIN_OPSET:", "if False:",
        ["tests/test_hostile_outputs.py::test_options_a_build_would_ignore_or_cannot_honour_are_refused_in_one_line"]),
    "the chosen build line drops the int8 KV cache": (
        "evaluate/budget.py", '        args += ["--llm-kv-cache", str(facts["llm_kv_cache"])]', "        pass",
        ["tests/test_hostile_outputs.py::test_the_chosen_build_line_keeps_the_kv_cache_it_measured"]),
    "the Triton hint pastes an unquoted path": (
        "cli.py", "{shlex.join(['tritonserver', '--model-repository', str(facts['model_repository'])])}",
        "tritonserver --model-repository {facts['model_repository']}",
        ["tests/test_hostile_outputs.py::test_the_triton_hint_quotes_the_repository_path_and_small_files_are_copies"]),
    "Triton hard-links the manifest": (
        "triton/repository.py", "    if source.stat().st_size >= LINK_FROM_BYTES:", "    if True:",
        ["tests/test_hostile_outputs.py::test_the_triton_hint_quotes_the_repository_path_and_small_files_are_copies"]),
    "training spins forever on fewer scenes than a batch": (
        "demovlm/train.py", "    if train_scenes < batch:\n        raise", "    if False:\n        raise",
        ["tests/test_demovlm.py::test_training_settings_no_run_can_use_are_one_line_before_anything_is_made"]),
    "training overwrites an existing run": (
        "demovlm/train.py", "    if resume is None and not force and ((out / RECORD_FILE).is_file()", "    if False and ((out / RECORD_FILE).is_file()",
        ["tests/test_demovlm.py::test_training_settings_no_run_can_use_are_one_line_before_anything_is_made"]),
    "the conversion cache loads altered weights": (
        "demovlm/smollm2.py", "and not untrusted(folder) and _hashes_match(folder):", "and not untrusted(folder):",
        ["tests/test_demovlm.py::test_the_conversion_cache_trusts_only_its_owner_and_its_recorded_hashes"]),
    "a shared conversion cache is trusted": (
        "demovlm/smollm2.py", "    problem = untrusted(root)\n", "    problem = None\n",
        ["tests/test_demovlm.py::test_the_conversion_cache_trusts_only_its_owner_and_its_recorded_hashes"]),
    "the decoder is run whatever the manifest says of it": (
        "runtime/llm.py", "        check_decoder_io(self.session, spec, base / spec.decoder)\n", "",
        ["tests/test_hostile_manifests.py"]),
    "NaN logits decode into an empty answer": (
        "runtime/llm.py", "    if not np.isfinite(rows).all():", "    if False:",
        ["tests/test_hostile_manifests.py::test_non_finite_logits_are_refused_not_decoded_into_an_empty_answer"]),
    "the image sizes of a manifest are not cross-checked": (
        "artifact/manifest.py", "        if len({v if isinstance(v, tuple) else (v, v) for v in sizes.values()}) != 1:", "        if False:",
        ["tests/test_hostile_manifests.py"]),
    "the vision graph's input shape is not compared with the manifest": (
        "runtime/vision.py", "    if len(actual) != len(want.shape) or any(", "    if False and any(",
        ["tests/test_hostile_manifests.py"]),
    "a reducer section is not checked": (
        "artifact/sections.py", "        if self.grid * self.grid != self.num_patches or self.image_size // self.patch_size != self.grid:",
        "        if False:", ["tests/test_hostile_manifests.py"]),
    "INT8 float parts are any strings": (
        "artifact/graph_facts.py", "            if not re.fullmatch(", "            if False and not re.fullmatch(",
        ["tests/test_hostile_manifests.py::test_int8_float_parts_must_be_measured_tower_parts"]),
    "a held-out wording reaches training": (
        "shapes_qa.py", '        self.instructions = [text for text, where in INSTRUCTIONS if where == split]',
        '        self.instructions = [text for text, where in INSTRUCTIONS]',
        ["tests/test_shapes_qa.py::test_held_out_wordings_and_style_never_reach_the_training_split"]),
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
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests],
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
