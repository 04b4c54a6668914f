"""The bad-input matrix (issue 11): every CLI command against every class of bad input that applies
to its arguments, as one table, :data:`CASES`.

A :class:`Case` is an argv template whose ``{name}`` placeholders are the inputs of
tests/bad_input_world.py (``{ck}``, ``{board}``, ``{key}``, ``{reg_db}``, ``{random_bin}``, ...)
and the case's own output paths (``{o_ck}``, ``{o_onnx}``, ``{o_dir}``, ``{o_db}``, ``{o_key}``,
``{o_board}``, ``{o_npy}``, all in an empty folder ``{T}``).  A case is *refused* (exit 2, one
line naming ``needle``, nothing written, inputs unchanged) unless it carries ``ok``: then it is a
documented success (exit 0, the inputs unchanged) and ``ok`` says why it is rightly accepted
(README "Bad input" lists them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    needle: str = ""  # a piece of the one-line message (case-insensitive)
    ok: str = ""  # a documented success: why it is accepted
    slow: bool = False


# ----------------------------------------------------------------------------- good invocations
COMPRESS = ("compress", "{model}", "-o", "{o_ck}", "--budget", "4.5", "--method", "rtn", "--workers", "1")
COMPRESS_CBQ = ("compress", "{model}", "-o", "{o_ck}", "--method", "cbq", "--steps", "1", "--calib-samples", "2")
EXPORT = ("export", "{ck}", "-o", "{o_onnx}")
MARKED = ("export", "{ck}", "-o", "{o_onnx}", "--board", "{board}", "--key", "{key}", "--registry", "{reg_db}",
          "--user", "alice", "--seed", "1")
BATCH = ("export-batch", "{ck}", "--customers", "{customers_txt}", "-o", "{o_dir}", "--board", "{board}",
         "--key", "{key}", "--registry", "{reg_db}", "--workers", "1", "--seed", "0")
INSPECT = ("inspect", "{ck}")
RUN = ("run", "{onnx_model}", "--text", "hello there")
RUN_O = ("run", "{onnx_model}", "--text", "hello there", "-o", "{o_npy}")
SERVE = ("serve", "{onnx_model}", "--port", "0")
KEYGEN = ("keygen", "-o", "{o_key}")
BOARD = ("board", "train", "{ck}", "-o", "{o_board}", "--key", "{key}", "--bits", "16", "--steps", "1")
ADD = ("registry", "add", "{o_db}", "--key", "{key}", "--user", "carol", "--bits", "16")
ADD_OLD = ("registry", "add", "{reg_db}", "--key", "{key}", "--user", "carol")
LIST = ("registry", "list", "{reg_db}", "--key", "{key}")
SHOW = ("registry", "show", "{reg_db}", "--key", "{key}", "--user", "alice")
REMOVE = ("registry", "remove", "{reg_db}", "--key", "{key}", "--user", "alice")
IMPORT = ("registry", "import", "{legacy_json}", "{o_db}", "--key", "{key}")
VERIFY = ("verify", "{marked_model}", "--board", "{board}", "--key", "{key}", "--registry", "{reg_db}")
GC = ("gc", "{ck}")


def put(base: tuple[str, ...], where, value: str) -> tuple[str, ...]:
    """``base`` with the value after flag ``where`` (or at position ``where``) set to ``value``;
    a flag not in ``base`` is appended."""
    argv = list(base)
    if isinstance(where, int):
        argv[where] = value
    elif where in argv:
        argv[argv.index(where) + 1] = value
    else:
        argv += [where, value]
    return tuple(argv)


def drop(base: tuple[str, ...], flag: str) -> tuple[str, ...]:
    argv = list(base)
    i = argv.index(flag)
    del argv[i:i + 2]
    return tuple(argv)


CASES: list[Case] = []


def refuse(id: str, argv, needle: str = "", slow: bool = False) -> None:
    CASES.append(Case(id, tuple(argv), needle=needle, slow=slow))


def accept(id: str, argv, why: str, slow: bool = False) -> None:
    CASES.append(Case(id, tuple(argv), ok=why, slow=slow))


# ----------------------------------------------------------------------------- classes of bad paths
FILE_BAD = {  # where a file is expected
    "missing": ("{nope}", "no such"),
    "folder": ("{emptydir}", ""),
    "zero": ("{zero_bin}", ""),
    "random": ("{random_bin}", ""),
    "under_file": ("{zero_bin}/x", ""),
}
FOLDER_BAD = {  # where a folder is expected
    "missing": ("{nope}", ""),
    "file": ("{random_bin}", ""),
    "zero_file": ("{zero_bin}", ""),
    "empty_folder": ("{emptydir}", ""),
    "under_file": ("{zero_bin}/x", ""),
}
TEXT_BAD = {**FILE_BAD, "latin1": ("{latin1_txt}", "UTF-8"), "blank": ("{blank_txt}", "no text")}
CK_BAD = {  # damaged checkpoints: (folder, a word of the message)
    **{f"weights_{h}": (f"{{ck_weights_{h}}}", "weights.safetensors") for h in ("missing", "zero", "random", "trunc", "dir")},
    **{f"manifest_{h}": (f"{{ck_manifest_{h}}}", "quantseal.json") for h in ("missing", "zero", "random", "trunc", "nonutf8", "dir")},
    "flipped_byte": ("{ck_flip}", "sha256"),
    **{f"lie_{f}": (f"{{ck_lie_{f}}}", w) for f, w in (
        ("shape", "shape"), ("format", ""), ("format_unknown", "int5_b64"), ("bytes", "bytes"), ("rank", "L1"),
        ("sha256", "sha256"), ("schema", "schema"), ("unknown_field", "colour"), ("missing_matrix_field", "format"))},
    "missing_tensor": ("{ck_missing_tensor}", "scales"),
    "nan_embedding": ("{ck_nan_embedding}", "embeddings.word_embeddings.weight"),
    "inf_scales": ("{ck_inf_scales}", "scales"),
    "nan_layernorm": ("{ck_nan_layernorm}", "LayerNorm"),
}
CK_SOURCE_BAD = {  # the source files a checkpoint carries (not hashed: hand-editable, but read)
    "config_random": ("{ck_config_random}", "config.json"),
    "config_zero": ("{ck_config_zero}", "config.json"),
    "config_missing": ("{ck_config_missing}", "config.json"),
}
BOARD_BAD = {
    **{f"weights_{h}": (f"{{board_weights_{h}}}", "board.safetensors") for h in ("missing", "zero", "random", "trunc")},
    **{f"manifest_{h}": (f"{{board_manifest_{h}}}", "board") for h in ("missing", "zero", "random", "nonutf8")},
    "nan": ("{board_nan}", "C0"),
    "lying_bits": ("{board_bits}", ""),
}
KEY_BAD = {**FILE_BAD, "short": ("{key_short}", "key"), "latin1": ("{key_latin1}", "key")}
REG_BAD = {
    **FILE_BAD,
    "truncated": ("{reg_trunc_db}", ""), "random_sqlite": ("{reg_random_db}", ""),
    "tampered_row": ("{reg_tampered_db}", "integrity"), "deleted_row": ("{reg_deleted_db}", "row"),
    "other_key": ("{reg_key2_db}", "another key"), "tampered_json": ("{legacy_tampered_json}", "integrity"),
}
ONNX_BAD = {**FILE_BAD, "zero_onnx": ("{onnx_zero_model}", ""), "random_onnx": ("{onnx_random_model}", ""),
            "trunc_onnx": ("{onnx_trunc_model}", ""), "folder_onnx": ("{dir_onnx}", ""),
            "checkpoint_folder": ("{ck}", "")}
OUT_FILE_BAD = {  # an output file path
    "under_file": ("{zero_bin}/x/OUT", ""),
    "under_proc": ("/proc/quantseal-test/OUT", ""),
    "under_sys": ("/sys/quantseal-test/OUT", ""),
    "is_folder": ("{emptydir}", ""),
}
OUT_FOLDER_BAD = {  # an output folder path
    "under_file": ("{zero_bin}/x", ""),
    "under_proc": ("/proc/quantseal-test", "/proc"),
    "under_sys": ("/sys/quantseal-test", "/sys"),
    "existing_file": ("{random_bin}", "not a folder"),
    "foreign_folder": ("{model}", "refusing to overwrite"),
    "dot": ("{T}/.", ""),
}

HOSTILE_IDS = {
    "empty": "",
    "too_long": "a" * 129,
    "slash": "a/b",
    "dotdot": "..",
    "parent_path": "../etc",
    "backslash": "a\\b",
    "newline": "a\nb",
    "nul": "a\x00b",
    "escape": "\x1b[31mred",
    "tab": "a\tb",
    "space": "a b",
    "zero_width": "a\u200bb",
    "rtl_override": "\u202eevil",
    "non_ascii": "café",
    "surrogate": "caf\udce9",  # a non-UTF-8 argv byte as Python passes it
    "sql_quote": "x'; DROP TABLE registry_customers; --",
    "sql_dquote": 'x" OR "1"="1',
    "leading_dot": ".hidden",
    "leading_dash": "-rf",
}


# ----------------------------------------------------------------------------- compress
for name, (p, w) in FOLDER_BAD.items():
    refuse(f"compress-model-{name}", put(COMPRESS, 1, p), w)
for name in ("missing", "zero", "random", "trunc", "nonutf8", "dir"):
    refuse(f"compress-model-config_{name}", put(COMPRESS, 1, f"{{model_config_{name}}}"), "config.json")
for name in ("zero", "random", "trunc"):
    refuse(f"compress-model-weights_{name}", put(COMPRESS, 1, f"{{model_weights_{name}}}"), "")
refuse("compress-model-unknown_type", put(COMPRESS, 1, "{model_unknown_type}"), "no-such-model")
refuse("compress-model-nan", put(COMPRESS, 1, "{model_nan}"), "embeddings.word_embeddings.weight")
refuse("compress-model-inf", put(COMPRESS, 1, "{model_inf}"), "query.weight")
refuse("compress-model-missing_weight", put(COMPRESS, 1, "{model_missing_weight}"), "output.dense.weight")
refuse("compress-model-checkpoint", put(COMPRESS, 1, "{ck}"), "")
refuse("compress-model-nan-cbq", put(COMPRESS_CBQ, 1, "{model_nan}"), "embeddings.word_embeddings.weight")
for name, (p, w) in TEXT_BAD.items():
    refuse(f"compress-calib-{name}", put(COMPRESS, "--calib", p) + ("--data-aware",), w)
    refuse(f"compress-cbq-calib-{name}", put(COMPRESS_CBQ, "--calib", p), w)
for name, (p, w) in OUT_FOLDER_BAD.items():
    refuse(f"compress-out-{name}", put(COMPRESS, "-o", p), w)
refuse("compress-out-ck_is_board", put(COMPRESS, "-o", "{board}"), "refusing")
for v in ("-1", "0", "nan", "inf", "-inf", "1e400", "33", "1e9", "abc", ""):
    refuse(f"compress-budget-{v or 'empty'}", put(COMPRESS, "--budget", v), "budget")
for v in ("-1", "0", "nan", "inf", "1e400", "abc"):
    refuse(f"compress-budget_mb-{v}", put(drop(COMPRESS, "--budget"), "--budget-mb", v), "budget-mb")
refuse("compress-budget_mb-too_small", put(drop(COMPRESS, "--budget"), "--budget-mb", "0.001"), "")
refuse("compress-no_budget", drop(COMPRESS, "--budget"), "budget")
refuse("compress-both_budgets", COMPRESS + ("--budget-mb", "5"), "budget")
for v in ("-5", "0", "nan", "1.5", "99999999999999999999999"):
    refuse(f"compress-calib_samples-{v[:8]}", put(COMPRESS, "--calib-samples", v), "calib-samples")
    refuse(f"compress-cbq-calib_samples-{v[:8]}", put(COMPRESS_CBQ, "--calib-samples", v), "calib-samples")
for v in ("-1", "0", "100000", "abc"):
    refuse(f"compress-workers-{v}", put(COMPRESS, "--workers", v), "workers")
for v in ("-1", "18446744073709551616", "1.5", "abc"):
    refuse(f"compress-seed-{v[:6]}", put(COMPRESS, "--seed", v), "seed")
for v in ("-1", "a", "100000", ",,"):
    refuse(f"compress-ranks-{v}", put(COMPRESS, "--ranks", v), "rank")
for v in ("int5", "nope", ",", "int4_b7"):
    refuse(f"compress-formats-{v}", put(COMPRESS, "--formats", v), "")
for v in ("-1", "0", "nan", "inf"):
    refuse(f"compress-max_decode_ms-{v}", put(COMPRESS, "--max-decode-ms", v), "max-decode-ms")
for flag, vals in (("--block", ("0", "-1", "7", "100000")), ("--window", ("0", "-1")), ("--rank", ("-1",)),
                   ("--steps", ("0", "-1")), ("--wbits", ("5", "0")), ("--abits", ("2",)), ("--table", ("int5_b7",)),
                   ("--init", ("zero",)), ("--gptq-order", ("random",)), ("--table-method", ("exact",)),
                   ("--hessian-tokens", ("0", "-1", "abc"))):
    for v in vals:
        refuse(f"compress-cbq{flag[1:]}-{v}", put(COMPRESS_CBQ, flag, v), flag.lstrip("-"))
refuse("compress-method-unknown", put(COMPRESS, "--method", "magic"), "method")
for name, (p, w) in {"missing": ("{nope}", ""), "file": ("{random_bin}", ""), "empty_folder": ("{emptydir}", ""),
                     "checkpoint": ("{ck}", "")}.items():
    refuse(f"compress-adapter-{name}", COMPRESS + ("--adapter", p), w)
for v in ("-3", "abc", "100000", "nan"):
    refuse(f"compress-adapter_rank-{v}", COMPRESS + ("--adapter", "{emptydir}", "--adapter-rank", v), "")
refuse("compress-adapter_rank-without_adapter", COMPRESS + ("--adapter-rank", "4"), "--adapter")
refuse("compress-adapter-cbq", COMPRESS_CBQ + ("--adapter", "{emptydir}"), "--adapter")

# ----------------------------------------------------------------------------- export
for name, (p, w) in {**FOLDER_BAD, **CK_BAD, **CK_SOURCE_BAD}.items():
    refuse(f"export-ck-{name}", put(EXPORT, 1, p), w)
for name in ("nan_embedding", "lie_shape", "flipped_byte", "manifest_random"):
    refuse(f"export-marked-ck-{name}", put(MARKED, 1, CK_BAD[name][0]), CK_BAD[name][1])
for name, (p, w) in {**FOLDER_BAD, **BOARD_BAD}.items():
    refuse(f"export-board-{name}", put(MARKED, "--board", p), w)
for name, (p, w) in KEY_BAD.items():
    refuse(f"export-key-{name}", put(MARKED, "--key", p), w)
refuse("export-key-wrong", put(MARKED, "--key", "{key2}"), "key")
for name, (p, w) in REG_BAD.items():
    refuse(f"export-registry-{name}", put(MARKED, "--registry", p), w)
refuse("export-registry-bad_url", put(MARKED, "--registry", "postgresql://nobody@127.0.0.1:1/none"), "")
refuse("export-user-unregistered", put(MARKED, "--user", "zed"), "zed")
refuse("export-user-removed", put(put(MARKED, "--registry", "{reg_removed_db}"), "--user", "alice"), "removed")
for name, uid in HOSTILE_IDS.items():
    refuse(f"export-user-{name}", put(MARKED, "--user", uid), "")
for name, (p, w) in OUT_FILE_BAD.items():
    refuse(f"export-out-{name}", put(EXPORT, "-o", p.replace("OUT", "model.onnx")), w)
    refuse(f"export-marked-out-{name}", put(MARKED, "-o", p.replace("OUT", "model.onnx")), w)
refuse("export-out-not_onnx", put(EXPORT, "-o", "{T}/model.txt"), ".onnx")
refuse("export-out-over_checkpoint", put(EXPORT, "-o", "{ck}"), "")
for v in ("-1", "5", "abc"):
    refuse(f"export-accuracy_level-{v}", put(EXPORT, "--accuracy-level", v), "accuracy-level")
for v in ("-1", "18446744073709551616", "abc"):
    refuse(f"export-seed-{v[:6]}", put(MARKED, "--seed", v), "seed")
refuse("export-seed-unmarked", EXPORT + ("--seed", "1"), "seed")
refuse("export-adapter-missing", EXPORT + ("--adapter", "{nope}"), "")
refuse("export-adapter-file", EXPORT + ("--adapter", "{random_bin}"), "")
refuse("export-adapter-empty_folder", EXPORT + ("--adapter", "{emptydir}"), "")
for v in ("0", "-1"):
    refuse(f"export-adapter_rank-{v}", EXPORT + ("--adapter", "{emptydir}", "--adapter-rank", v), "")
refuse("export-half_watermark", drop(MARKED, "--user"), "--user")
refuse("export-dtype", put(EXPORT, "--dtype", "int3"), "dtype")
refuse("export-switchable-no_adapter", EXPORT + ("--switchable",), "")
refuse("export-switchable-bad_name", EXPORT + ("--switchable", "--adapter", "a/b={emptydir}"), "")

# ----------------------------------------------------------------------------- export-batch
for name, (p, w) in {**TEXT_BAD, "blank": ("{blank_txt}", "no customer ids")}.items():
    refuse(f"batch-customers-{name}", put(BATCH, "--customers", p), w)
for name in ("slash", "dup", "unknown", "ctrl", "dotdot", "sql"):
    refuse(f"batch-customers-{name}", put(BATCH, "--customers", f"{{cust_{name}_txt}}"), "")
for name in ("missing", "file", "empty_folder"):
    refuse(f"batch-ck-{name}", put(BATCH, 1, FOLDER_BAD[name][0]), "")
for name in ("nan_embedding", "flipped_byte", "lie_bytes"):
    refuse(f"batch-ck-{name}", put(BATCH, 1, CK_BAD[name][0]), CK_BAD[name][1])
for name, (p, w) in BOARD_BAD.items():
    refuse(f"batch-board-{name}", put(BATCH, "--board", p), w)
for name in ("missing", "zero", "short"):
    refuse(f"batch-key-{name}", put(BATCH, "--key", KEY_BAD[name][0]), KEY_BAD[name][1])
refuse("batch-key-wrong", put(BATCH, "--key", "{key2}"), "key")
for name in ("missing", "random", "tampered_row", "other_key"):
    refuse(f"batch-registry-{name}", put(BATCH, "--registry", REG_BAD[name][0]), REG_BAD[name][1])
for name, (p, w) in OUT_FOLDER_BAD.items():
    if name not in ("foreign_folder", "dot"):
        refuse(f"batch-out-{name}", put(BATCH, "-o", p), "")
for v in ("0", "-1", "100000", "abc"):
    refuse(f"batch-workers-{v}", put(BATCH, "--workers", v), "workers")
for v in ("-1", "abc"):
    refuse(f"batch-seed-{v}", put(BATCH, "--seed", v), "seed")
refuse("batch-accuracy_level-9", put(BATCH, "--accuracy-level", "9"), "accuracy-level")

# ----------------------------------------------------------------------------- inspect
for name, (p, w) in {**FOLDER_BAD, **CK_BAD}.items():
    refuse(f"inspect-{name}", put(INSPECT, 1, p), w)
for name in ("zero_onnx", "random_onnx", "trunc_onnx", "folder_onnx"):
    refuse(f"inspect-{name}", put(INSPECT, 1, ONNX_BAD[name][0]), "")
accept("inspect-onnx_without_tokenizer", put(INSPECT, 1, "{onnx_no_tokenizer_model}"),
       "inspect reads only the ONNX graph; the tokenizer is needed to run it, not to describe it")
accept("inspect-checkpoint_config_random", put(INSPECT, 1, "{ck_config_random}"),
       "inspect reads the manifest and the hashed tensors; config.json is read by the commands that build a model")

# ----------------------------------------------------------------------------- run
for name, (p, w) in ONNX_BAD.items():
    refuse(f"run-model-{name}", put(RUN, 1, p), w)
refuse("run-model-no_tokenizer", put(RUN, 1, "{onnx_no_tokenizer_model}"), "tokenizer")
refuse("run-model-tokenizer_random", put(RUN, 1, "{onnx_tokenizer_random_model}"), "tokenizer")
for name, (p, w) in TEXT_BAD.items():
    refuse(f"run-text_file-{name}", ("run", "{onnx_model}", "--text-file", p), w)
for name, (p, w) in {"missing": ("{nope}", ""), "random": ("{random_bin}", ""), "zero": ("{zero_bin}", "")}.items():
    refuse(f"run-tokenizer-{name}", RUN + ("--tokenizer", p), w)
for name, t in (("surrogate", "caf\udce9"), ("only_surrogate", "\udcff\udcfe"), ("empty", ""), ("blank", "   ")):
    refuse(f"run-text-{name}", put(RUN, "--text", t), "text")
refuse("run-prompt-surrogate", ("run", "{onnx_model}", "--prompt", "caf\udce9"), "")
refuse("run-prompt-encoder", ("run", "{onnx_model}", "--prompt", "hello"), "")
for name, (p, w) in OUT_FILE_BAD.items():
    refuse(f"run-out-{name}", put(RUN_O, "-o", p.replace("OUT", "e.npy")), w)
refuse("run-out-not_npy", put(RUN_O, "-o", "{T}/e.txt"), ".npy")
for v in ("0", "-1", "100000", "abc"):
    refuse(f"run-threads-{v}", RUN + ("--threads", v), "threads")
for v in ("0", "1", "-1", "100000"):
    refuse(f"run-max_length-{v}", RUN + ("--max-length", v), "length")
refuse("run-provider", RUN + ("--provider", "tpu"), "provider")
for name, a in (("unknown", "nope"), ("surrogate", "caf\udce9"), ("empty", "")):
    refuse(f"run-adapter-{name}", RUN + ("--adapter", a), "adapter")

# ----------------------------------------------------------------------------- serve (start-up arguments)
for name, (p, w) in ONNX_BAD.items():
    refuse(f"serve-model-{name}", put(SERVE, 1, p), w)
refuse("serve-model-no_tokenizer", put(SERVE, 1, "{onnx_no_tokenizer_model}"), "tokenizer")
for v in ("-1", "65536", "99999999999", "abc", "1.5"):
    refuse(f"serve-port-{v}", put(SERVE, "--port", v), "port")
refuse("serve-port-busy", put(SERVE, "--port", "{busy_port}"), "cannot listen")
refuse("serve-host-bad", SERVE + ("--host", "999.1.1.1"), "cannot listen")
refuse("serve-host-unresolvable", SERVE + ("--host", "no-such-host.invalid"), "cannot listen")
for flag, vals in (("--threads", ("0", "-1", "100000")), ("--workers", ("0", "-1", "257")),
                   ("--max-chars", ("0", "-1")), ("--max-batch", ("0", "-5")),
                   ("--header-timeout", ("0", "-1", "nan", "inf")), ("--body-timeout", ("0", "nan", "1e9")),
                   ("--max-length", ("0", "1", "100000"))):
    for v in vals:
        refuse(f"serve{flag[1:]}-{v}", SERVE + (flag, v), flag.lstrip("-").split("-")[-1])
for name, p in (("missing", "{nope}"), ("zero", "{zero_bin}"), ("folder", "{emptydir}"), ("control_chars", "{token_ctrl_txt}"),
                ("latin1", "{latin1_txt}")):
    refuse(f"serve-token_file-{name}", SERVE + ("--token-file", p), "token")
for name, a in (("unknown", "nope"), ("empty", "")):
    refuse(f"serve-adapter-{name}", SERVE + ("--adapter", a), "adapter")
accept("serve-port-0", SERVE, "port 0 asks the system for a free port (the bound URL is printed)")

# ----------------------------------------------------------------------------- keygen
for name, (p, w) in OUT_FILE_BAD.items():
    refuse(f"keygen-out-{name}", put(KEYGEN, "-o", p.replace("OUT", "key")), w)
refuse("keygen-out-existing_key", put(KEYGEN, "-o", "{key}"), "--force")
refuse("keygen-out-existing_file", put(KEYGEN, "-o", "{random_bin}"), "--force")
refuse("keygen-out-folder_force", put(KEYGEN, "-o", "{emptydir}") + ("--force",), "folder")

# ----------------------------------------------------------------------------- board train
for name, (p, w) in {**FOLDER_BAD, **{k: CK_BAD[k] for k in ("weights_trunc", "manifest_random", "flipped_byte",
                                                            "lie_shape", "nan_embedding", "inf_scales",
                                                            "missing_tensor")}}.items():
    refuse(f"board-ck-{name}", put(BOARD, 2, p), w)
for name, (p, w) in KEY_BAD.items():
    refuse(f"board-key-{name}", put(BOARD, "--key", p), w)
for name, (p, w) in TEXT_BAD.items():
    refuse(f"board-calib-{name}", BOARD + ("--calib", p), w)
for name, (p, w) in OUT_FOLDER_BAD.items():
    refuse(f"board-out-{name}", put(BOARD, "-o", p), w)
refuse("board-out-over_checkpoint", put(BOARD, "-o", "{ck}"), "refusing")
for flag, vals in (("--bits", ("0", "-8", "12", "4", "2048", "100000000", "nan")), ("--steps", ("0", "-1")),
                   ("--rank", ("0", "-1", "100000")), ("--triggers-per-bit", ("0", "-1")),
                   ("--seed", ("-1", "18446744073709551616"))):
    for v in vals:
        refuse(f"board{flag[1:]}-{v[:6]}", put(BOARD, flag, v), flag.lstrip("-").split("-")[0])

# ----------------------------------------------------------------------------- registry
for name, uid in HOSTILE_IDS.items():
    refuse(f"registry-add-user-{name}", put(ADD, "--user", uid), "")
    refuse(f"registry-show-user-{name}", put(SHOW, "--user", uid), "")
    refuse(f"registry-remove-user-{name}", put(REMOVE, "--user", uid), "")
for v in ("100000000", "0", "-16", "12", "8", "2048", "abc"):
    refuse(f"registry-add-bits-{v}", put(ADD, "--bits", v), "bits")
refuse("registry-add-bits-mismatch", put(ADD_OLD, "--bits", "32"), "16")
for name, (p, w) in KEY_BAD.items():
    refuse(f"registry-add-key-{name}", put(ADD, "--key", p), w)
refuse("registry-add-key-wrong", put(ADD_OLD, "--key", "{key2}"), "another key")
for name, (p, w) in {**REG_BAD, "legacy_json": ("{legacy_json}", "registry import"),
                     "tampered_json": ("{legacy_tampered_json}", "registry import")}.items():
    if name in ("missing", "zero"):  # a new registry; a 0-byte file is one a concurrent first add has just made
        continue
    refuse(f"registry-add-db-{name}", put(ADD_OLD, 2, p), w)
for name, p in (("under_proc", "/proc/quantseal-test.db"), ("under_sys", "/sys/quantseal-test.db"),
                ("missing_parent", "{T}/no/such/dir/r.db")):
    refuse(f"registry-add-db-{name}", put(ADD, 2, p), "")
refuse("registry-add-db-bad_url", put(ADD, 2, "postgresql://nobody@127.0.0.1:1/none"), "")
refuse("registry-add-removed_again", put(put(ADD_OLD, 2, "{reg_removed_db}"), "--user", "alice"), "removed")
for name, (p, w) in {**REG_BAD, "unknown_scheme": ("mysql://x/y", "")}.items():
    refuse(f"registry-list-db-{name}", put(LIST, 2, p), w)
    refuse(f"registry-show-db-{name}", put(SHOW, 2, p), w)
for name in ("missing", "random", "tampered_row", "other_key"):
    refuse(f"registry-remove-db-{name}", put(REMOVE, 2, REG_BAD[name][0]), REG_BAD[name][1])
refuse("registry-remove-db-tampered_json", put(REMOVE, 2, "{legacy_tampered_json}"), "registry import")
refuse("registry-remove-db-legacy_json", put(REMOVE, 2, "{legacy_json}"), "registry import")
for name, (p, w) in KEY_BAD.items():
    refuse(f"registry-list-key-{name}", put(LIST, "--key", p), w)
refuse("registry-list-key-wrong", put(LIST, "--key", "{key2}"), "another key")
refuse("registry-show-unknown", put(SHOW, "--user", "zed"), "zed")
refuse("registry-remove-unknown", put(REMOVE, "--user", "zed"), "zed")
refuse("registry-remove-twice", put(put(REMOVE, 2, "{reg_removed_db}"), "--user", "alice"), "already removed")
accept("registry-show-removed", put(put(SHOW, 2, "{reg_removed_db}"), "--user", "alice"),
       "a removed customer is kept as a tombstone; show prints its row with status 'removed'")
for name, (p, w) in {**FILE_BAD, "latin1": ("{latin1_txt}", "registry"), "blank": ("{blank_txt}", "registry"),
                     "tampered": ("{legacy_tampered_json}", "integrity"),
                     "hostile_id": ("{legacy_hostile_json}", "customer id"), "database": ("{reg_db}", "already"),
                     "other_key": ("{legacy_json}", "")}.items():
    argv = put(IMPORT, 2, p) if name != "other_key" else put(IMPORT, "--key", "{key2}")
    refuse(f"registry-import-source-{name}", argv, w)
for name, p in (("folder", "{emptydir}"), ("random", "{random_bin}"), ("other_key", "{reg_key2_db}"),
                ("tampered", "{reg_tampered_db}"), ("under_file", "{zero_bin}/x.db"),
                ("under_proc", "/proc/quantseal-test.db")):
    refuse(f"registry-import-db-{name}", put(IMPORT, 3, p), "")

# ----------------------------------------------------------------------------- verify
for name, (p, w) in ONNX_BAD.items():
    refuse(f"verify-suspect-{name}", put(VERIFY, 1, p), w)
for name, (p, w) in {**FOLDER_BAD, **BOARD_BAD}.items():
    if name.startswith("weights_") or name == "nan":
        accept(f"verify-board-{name}", put(VERIFY, "--board", p),
               "verify reads the board's manifest and tokenizer only (the triggers come from the key); "
               "its branch tensors are needed to export, not to read a suspect")
    else:
        refuse(f"verify-board-{name}", put(VERIFY, "--board", p), w)
for name, (p, w) in KEY_BAD.items():
    refuse(f"verify-key-{name}", put(VERIFY, "--key", p), w)
refuse("verify-key-wrong", put(VERIFY, "--key", "{key2}"), "key")
for name, (p, w) in REG_BAD.items():
    refuse(f"verify-registry-{name}", put(VERIFY, "--registry", p), w)
for v in ("0", "1", "2", "-1", "nan", "inf", "abc"):
    refuse(f"verify-alpha-{v}", put(VERIFY, "--alpha", v), "alpha")
for v in ("0", "-1"):
    refuse(f"verify-max_triggers-{v}", put(VERIFY, "--max-triggers", v), "max-triggers")
for name, v in (("name", "zeta"), ("id", "3"), ("empty", "")):  # the suspect has no switchable adapters
    refuse(f"verify-adapter-{name}", VERIFY + ("--adapter", v), "adapter")
URL = ("verify", "{url}", "--board", "{board}", "--key", "{key}", "--registry", "{reg_db}", "--timeout", "2")
for flag, vals in (("--timeout", ("0", "-1", "nan", "inf")), ("--deadline", ("0", "nan")),
                   ("--max-response-mb", ("0", "-1", "nan")), ("--qps", ("0", "nan")), ("--retries", ("-1", "101"))):
    for v in vals:
        refuse(f"verify-url{flag[1:]}-{v}", put(URL, flag, v), flag.lstrip("-"))
for name, h in (("no_colon", "Authorization"), ("newline", "X: a\nb"), ("surrogate", "X: caf\udce9")):
    refuse(f"verify-url-header-{name}", URL + ("--header", h), "header")
for name, p in (("missing", "{nope}"), ("zero", "{zero_bin}"), ("control_chars", "{token_ctrl_txt}")):
    refuse(f"verify-url-api_key_file-{name}", URL + ("--api-key-file", p), "token")
for name, u, w in (("refused", "http://127.0.0.1:{closed_port}", "does not answer"),
                   ("no_host", "http://", "http://"), ("bad_port", "http://127.0.0.1:99999", "port"),
                   ("unresolvable", "http://no-such-host.invalid:8000", "does not answer"),
                   ("not_json", "{url}/notjson", "not JSON"), ("json_list", "{url}/list", "JSON object"),
                   ("html_500", "{url}/error", "HTTP 500"), ("huge", "{url}/huge", "cap"),
                   ("stalls", "{url}/stall", "answer within"), ("scheme_ftp", "ftp://127.0.0.1/x", "no such file")):
    argv = put(URL, 1, u)
    if name == "huge":
        argv = put(argv, "--max-response-mb", "0.01")
    if name == "stalls":
        argv = put(argv, "--timeout", "0.5")
    refuse(f"verify-url-{name}", argv, w)
refuse("verify-api-for_file", VERIFY + ("--api", "openai-chat"), "http")
accept("verify-unmarked", put(VERIFY, 1, "{onnx_model}"),
       "an unmarked model is a valid suspect: verify answers 'owner: none' with its p-value")

# ----------------------------------------------------------------------------- gc
refuse("gc-missing_parent", ("gc", "{nope}/x/y"), "no such folder")
refuse("gc-under_file", ("gc", "{zero_bin}/x"), "")
accept("gc-a_file", ("gc", "{random_bin}"), "gc cleans the leftovers beside a path; a file has none: 'nothing to clean'")
accept("gc-clean_folder", GC, "nothing was left behind: 'nothing to clean'")

# ----------------------------------------------------------------------------- read-only folder
# ``{ro}``: a folder nobody may write in (mode 0555; for root, immutable: chattr +i); skipped where
# neither can be had
for cmd, argv in (("compress", put(COMPRESS, "-o", "{ro}/ck")), ("export", put(EXPORT, "-o", "{ro}/model.onnx")),
                  ("export-marked", put(MARKED, "-o", "{ro}/m/model.onnx")), ("export-batch", put(BATCH, "-o", "{ro}/b")),
                  ("run", put(RUN_O, "-o", "{ro}/e.npy")), ("keygen", put(KEYGEN, "-o", "{ro}/key")),
                  ("board", put(BOARD, "-o", "{ro}/board")), ("registry-add", put(ADD, 2, "{ro}/r.db")),
                  ("registry-import", put(IMPORT, 3, "{ro}/r.db"))):
    refuse(f"{cmd}-out-read_only_folder", argv, "")

# ----------------------------------------------------------------------------- usage
for argv in (("frobnicate",), ("registry",), ("board",), ("compress", "--nope"), ("export",), ("registry", "add")):
    refuse("usage-" + "-".join(a.strip("-") for a in argv), argv, "")

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
