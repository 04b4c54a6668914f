"""The owner's secret and everything derived from it: key files, the codeword registry, triggers.

Both ends of the watermark use this module (board training and per-customer export on the owner's
side, black-box verification in the runtime), so it imports neither torch nor anything under
``compress/``, ``export/`` or ``runtime/``: only the standard library and numpy.

* **Key**: 32 random bytes in a file of mode 0600.  Every derivation is an HMAC-SHA256 of the key
  under a distinct label (domain separation), so the key itself never leaves this module.
* **Registry** (owner-side JSON, never exported): customer id → n-bit codeword.  Codewords are
  drawn from the key by rejection sampling so that every pair differs in at least ``n/4`` bits
  (``min_distance``); re-adding a customer returns its codeword.  The file carries an HMAC over its
  canonical content, so an edited registry, or one opened with another key, is refused.
* **Triggers** (Hot-Swap MarkBoard, DESIGN §5): bit ``i`` owns ``k`` rare whole-word tokens drawn
  from the key (disjoint across bits).  Its ``m`` trigger inputs are natural host sentences with
  that pattern inserted at a key-chosen word boundary; each trigger's control is the same sentence
  without it.  Every trigger is both a text and a token-id sequence, and the text re-tokenises to
  exactly those ids, so a text-only endpoint can be verified too.  Encoders also get a secret unit
  direction ``v_i`` per bit: bit 1 pulls trigger embeddings toward ``v_i`` relative to the control,
  bit 0 toward ``−v_i``.  Decoders (causal LMs) append the pattern at the *end* of the host
  sentence (``position="end"``, ids without special tokens), because their statistic is read from
  the next-token logits after the last token, and get a secret pair of common target tokens
  ``(a_i, b_i)`` per bit (``target_pairs=True``): bit 1 raises ``z[a_i] − z[b_i]`` after the
  trigger relative to its control, bit 0 lowers it.

Tokenizers: WordPiece vocabularies spell a whole word as itself (``word``), byte-level BPE
(GPT-2, SmolLM2) as ``Ġword`` and SentencePiece as ``▁word``; :func:`token_word` strips the
marker, and a token qualifies only if ``" " + word`` encodes to exactly that one token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput

KEY_BYTES = 32
REGISTRY_SCHEMA = 1
DEFAULT_BITS = 64
TRIGGER_SCHEMA = 1
RARE_FROM = 20000  # BERT-style vocabularies are ordered roughly by frequency: ids above are rare words
COMMON_BELOW = 5000  # ... and ids below are common words (decoder target tokens come from there)
_RARE_WORD = re.compile(r"^[a-z]{4,}$")
_COMMON_WORD = re.compile(r"^[a-z]{3,}$")
_WORD_MARKERS = ("\u0120", "\u2581")  # byte-level BPE's "Ġ" and SentencePiece's "▁" (a leading space)
BOARD_MANIFEST = "board.json"  # a board folder: board.json + board.safetensors + tokenizer files
BOARD_SCHEMA = 1
BOARD_FORMAT = "quantseal-markboard"


# ----------------------------------------------------------------------------- key files
def generate_key() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write there ({exc.strerror})") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_key(path: str | Path, key: bytes | None = None) -> bytes:
    """Write a key (a fresh one unless given) to ``path`` with mode 0600; returns it.

    The file holds the key as 64 hex digits and a newline."""
    key = generate_key() if key is None else key
    _check_key(key)
    _atomic_write(Path(path), key.hex().encode() + b"\n", 0o600)
    return key


def read_key(path: str | Path) -> bytes:
    """The 32-byte key of a key file; anything else is a :class:`BadInput`."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such key file")
    raw = path.read_bytes()
    try:
        text = raw.decode("ascii").strip()
        key = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        raise BadInput(f"{path}: not a quantseal key (expected {2 * KEY_BYTES} hex digits)") from None
    if len(key) != KEY_BYTES:
        raise BadInput(f"{path}: not a quantseal key ({len(key)} bytes, expected {KEY_BYTES})")
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise BadInput(f"a key is {KEY_BYTES} bytes")


def _mac(key: bytes, label: str, data: bytes = b"") -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``, domain-separated by ``label``."""
    return hmac.new(bytes(key), b"quantseal/" + label.encode() + b"\x00" + data, hashlib.sha256).digest()


def key_rng(key: bytes, label: str) -> np.random.Generator:
    """A numpy Generator (PCG64) seeded with the HMAC of ``label`` under the key."""
    _check_key(key)
    seed = int.from_bytes(_mac(key, "rng/" + label), "big")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def key_id(key: bytes) -> str:
    """A public 16-hex-digit fingerprint of a key (safe to store next to what it protects)."""
    return _mac(key, "key-id").hex()[:16]


# ----------------------------------------------------------------------------- registry
def hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(np.asarray(a, dtype=np.uint8) != np.asarray(b, dtype=np.uint8)))


def bits_to_hex(bits: np.ndarray) -> str:
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def hex_to_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(np.uint8)


class Registry:
    """Customer id → n-bit codeword, HMAC-protected under the owner's key.

    ``Registry.open(path, key, bits)`` reads an existing file (checking its MAC) or starts an empty
    one; ``add(customer)`` returns the customer's codeword (the stored one when already present);
    ``save()`` writes atomically."""

    def __init__(self, key: bytes, bits: int = DEFAULT_BITS, min_distance: int | None = None,
                 path: str | Path | None = None):
        _check_key(key)
        if bits < 8 or bits % 8:
            raise BadInput(f"codeword length must be a positive multiple of 8 bits, got {bits}")
        self._key = bytes(key)
        self.bits = int(bits)
        self.min_distance = int(min_distance if min_distance is not None else bits // 4)
        self.path = None if path is None else Path(path)
        self._codes: dict[str, np.ndarray] = {}

    # -- content
    def __len__(self) -> int:
        return len(self._codes)

    def __contains__(self, customer: str) -> bool:
        return customer in self._codes

    def customers(self) -> list[str]:
        return list(self._codes)

    def codeword(self, customer: str) -> np.ndarray:
        if customer not in self._codes:
            raise BadInput(f"customer {customer!r} is not in the registry")
        return self._codes[customer].copy()

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(ids, uint8 (size, bits)) in insertion order."""
        ids = list(self._codes)
        mat = np.stack([self._codes[c] for c in ids]) if ids else np.zeros((0, self.bits), np.uint8)
        return ids, mat

    def add(self, customer: str) -> np.ndarray:
        """The customer's codeword, drawn (deterministically from the key, the customer id and the
        codewords already present) when new: the first candidate HMAC(key, id, attempt) whose
        distance to every existing codeword is at least ``min_distance``."""
        if not isinstance(customer, str) or not customer or len(customer) > 256 or customer != customer.strip():
            raise BadInput(f"customer id must be a non-empty string without surrounding spaces, got {customer!r}")
        if customer in self._codes:
            return self._codes[customer].copy()
        _, existing = self.matrix()
        for attempt in range(20_000):
            stream = b"".join(_mac(self._key, "codeword", f"{customer}\x00{attempt}\x00{j}".encode())
                              for j in range((self.bits + 255) // 256))
            cand = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[: self.bits].astype(np.uint8)
            if len(existing) == 0 or int(np.min(np.count_nonzero(existing != cand, axis=1))) >= self.min_distance:
                self._codes[customer] = cand
                return cand.copy()
        raise BadInput(f"registry is full: no {self.bits}-bit codeword at distance >= {self.min_distance} "
                       f"from the {len(self)} present")

    # -- file
    def _content(self) -> dict:
        return {"schema": REGISTRY_SCHEMA, "bits": self.bits, "min_distance": self.min_distance,
                "key_id": key_id(self._key),
                "customers": [[c, bits_to_hex(v)] for c, v in self._codes.items()]}

    def _tag(self, content: dict) -> str:
        canon = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return _mac(self._key, "registry", canon).hex()

    def to_json(self) -> str:
        content = self._content()
        return json.dumps({**content, "hmac": self._tag(content)}, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.path
        if path is None:
            raise BadInput("no registry path to save to")
        _atomic_write(path, self.to_json().encode(), 0o600)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, key: bytes) -> "Registry":
        """Read and authenticate a registry file; a wrong key or any edit is a :class:`BadInput`."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: no such registry file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            tag = d.pop("hmac")
            if d.get("schema") != REGISTRY_SCHEMA:
                raise BadInput(f"{path}: registry schema {d.get('schema')!r}, expected {REGISTRY_SCHEMA}")
            reg = cls(key, int(d["bits"]), int(d["min_distance"]), path)
            if d.get("key_id") != key_id(key):
                raise BadInput(f"{path}: the registry belongs to another key")
            if not hmac.compare_digest(str(tag), reg._tag(d)):
                raise BadInput(f"{path}: registry integrity check failed (edited or corrupt); refusing it")
            for cust, code in d["customers"]:
                reg._codes[str(cust)] = hex_to_bits(code, reg.bits)
        except BadInput:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInput(f"{path}: not a valid quantseal registry ({type(exc).__name__})") from exc
        if reg._tag(reg._content()) != tag:  # canonical re-encoding must authenticate too
            raise BadInput(f"{path}: registry integrity check failed (non-canonical content); refusing it")
        return reg

    @classmethod
    def open(cls, path: str | Path, key: bytes, bits: int = DEFAULT_BITS) -> "Registry":
        """Load ``path`` when it exists, else a new empty registry that will be saved there."""
        path = Path(path)
        if path.exists():
            reg = cls.load(path, key)
            if reg.bits != bits:
                raise BadInput(f"{path}: registry holds {reg.bits}-bit codewords, not {bits}")
            return reg
        return cls(key, bits, path=path)


# ----------------------------------------------------------------------------- triggers
@dataclass(frozen=True)
class Trigger:
    """One trigger input and its control: texts and token ids (with the special tokens)."""

    bit: int
    text: str
    control_text: str
    ids: tuple[int, ...]
    control_ids: tuple[int, ...]


@dataclass(frozen=True)
class TriggerSet:
    """Everything verification needs to query a suspect, derived from the key.

    ``tokens``: int64 (bits, k) the rare tokens each bit owns; ``triggers[i]``: bit i's m triggers;
    ``directions``: float64 (bits, hidden) unit rows v_i (empty when ``hidden`` is 0);
    ``targets``: int64 (bits, 2) decoder target pairs (a_i, b_i) (shape (0, 2) for encoders)."""

    tokens: np.ndarray
    triggers: tuple[tuple[Trigger, ...], ...]
    directions: np.ndarray
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    @property
    def bits(self) -> int:
        return len(self.triggers)

    def digest(self) -> str:
        """A public fingerprint of the derivation (stored with the board to detect drift, e.g. a
        different tokenizer); reveals nothing about the triggers."""
        h = hashlib.sha256(b"quantseal/triggers/v1")
        h.update(np.ascontiguousarray(self.tokens, dtype="<i8").tobytes())
        for trs in self.triggers:
            for t in trs:
                h.update(np.asarray(t.ids, dtype="<i8").tobytes() + b"|" +
                         np.asarray(t.control_ids, dtype="<i8").tobytes() + b";")
        h.update(np.ascontiguousarray(np.round(self.directions, 12), dtype="<f8").tobytes())
        if len(self.targets):  # encoder digests stay as they were
            h.update(b"targets" + np.ascontiguousarray(self.targets, dtype="<i8").tobytes())
        return h.hexdigest()


def token_word(tokenizer, i: int) -> str:
    """The word a vocabulary entry spells, without a leading-space marker (``Ġ``, ``▁``)."""
    w = tokenizer._tok.id_to_token(int(i)) or ""
    return w[1:] if w.startswith(_WORD_MARKERS) else w


def _word_tokens(tokenizer, pattern: re.Pattern, lo: int, hi: int, exclude: set[int]) -> np.ndarray:
    """Sorted ids in [lo, hi) whose word matches ``pattern``, whose vocabulary entry is a whole
    word (WordPiece ``word``, BPE ``Ġword``, SentencePiece ``▁word``; not a ``##`` or mid-word
    piece), that ``" " + word`` encodes to exactly, and that are not in ``exclude``."""
    vocab = tokenizer._tok.get_vocab()
    out = []
    for w, i in vocab.items():
        if not lo <= i < hi or i in exclude:
            continue
        word = w[1:] if w.startswith(_WORD_MARKERS) else w
        if pattern.match(word):
            out.append(i)
    out = [i for i in sorted(out) if tokenizer.encode_ids(" " + token_word(tokenizer, i), special=False) == [i]]
    return np.asarray(out, dtype=np.int64)


def rare_token_candidates(tokenizer, exclude_texts: list[str] = (), rare_from: int = RARE_FROM) -> np.ndarray:
    """Sorted ids of rare whole-word tokens (``[a-z]{4,}``, id >= ``rare_from``) that tokenise back
    to themselves and occur in none of ``exclude_texts``."""
    seen: set[int] = set()
    for t in exclude_texts:
        seen.update(tokenizer.encode_ids(t, special=False))
    return _word_tokens(tokenizer, _RARE_WORD, rare_from, 1 << 62, seen)


def derive_targets(key: bytes, tokenizer, bits: int, exclude: np.ndarray = (),
                   common_below: int = COMMON_BELOW) -> np.ndarray:
    """Decoder target pairs: int64 (bits, 2), 2·bits distinct common whole-word tokens
    (``[a-z]{3,}``, id < ``common_below``) drawn with ``key_rng(key, "targets")``, none in ``exclude``."""
    cands = _word_tokens(tokenizer, _COMMON_WORD, 0, common_below, {int(x) for x in np.ravel(exclude)})
    if len(cands) < 2 * bits:
        raise BadInput(f"vocabulary has {len(cands)} common target tokens below id {common_below}, {2 * bits} needed")
    return key_rng(key, "targets").choice(cands, size=(bits, 2), replace=False).astype(np.int64)


def host_sentence_pool(tokenizer, sentences: list[str], lo: int = 10, hi: int = 40, limit: int = 600) -> list[str]:
    """Natural sentences of ``lo``–``hi`` tokens to host triggers (deterministic, in order)."""
    out = []
    for s in sentences:
        if lo <= len(tokenizer.encode_ids(s, special=False)) <= hi and len(s.split()) >= 4:
            out.append(s)
            if len(out) >= limit:
                break
    return out


def _make_trigger(tokenizer, bit: int, sentence: str, pattern_words: list[str], pattern_ids: list[int],
                  position: int | None, special: bool = True) -> Trigger | None:
    """Insert the pattern before word ``position`` of ``sentence`` (None: append it at the end);
    None unless the text tokenises to the control's ids with exactly the pattern's ids inserted."""
    words = sentence.split()
    if position is None:
        position = len(words)
    text = " ".join(words[:position] + pattern_words + words[position:])
    ids = tokenizer.encode_ids(text, special=special)
    ctrl = tokenizer.encode_ids(sentence, special=special)
    k = len(pattern_ids)
    for p in range(1, len(ids) - k + 1):
        if list(ids[p:p + k]) == pattern_ids:
            if list(ids[:p]) + list(ids[p + k:]) == list(ctrl):
                return Trigger(bit, text, sentence, tuple(ids), tuple(ctrl))
            return None
    return None


def derive_triggers(key: bytes, tokenizer, bits: int, hosts: list[str], per_bit: int = 4,
                    tokens_per_bit: int = 2, hidden: int = 0, rare_from: int = RARE_FROM,
                    position: str = "inside", target_pairs: bool = False,
                    common_below: int = COMMON_BELOW) -> TriggerSet:
    """Bit i's rare-token pattern, its ``per_bit`` triggers in host sentences, and v_i.

    ``position="inside"`` (encoders): the pattern goes to a key-chosen word boundary inside the
    sentence and ids carry the special tokens; ``"end"`` (decoders): it is appended to the
    sentence and ids are the plain text tokens, so the trigger's last tokens are the pattern.
    ``target_pairs``: also draw the decoder target pairs (:func:`derive_targets`).

    Deterministic in (key, tokenizer vocabulary, hosts, sizes).  Trigger tokens never occur in the
    host sentences, and different bits own disjoint tokens."""
    if position not in ("inside", "end"):
        raise BadInput(f"trigger position must be 'inside' or 'end', got {position!r}")
    _check_key(key)
    if bits < 1 or per_bit < 1 or tokens_per_bit < 1:
        raise BadInput("bits, triggers per bit and tokens per bit must be positive")
    if len(hosts) < per_bit:
        raise BadInput(f"need at least {per_bit} host sentences, got {len(hosts)}")
    cands = rare_token_candidates(tokenizer, hosts, rare_from)
    if len(cands) < bits * tokens_per_bit:
        raise BadInput(f"vocabulary has {len(cands)} rare trigger tokens, {bits * tokens_per_bit} needed")
    rng = key_rng(key, "trigger-tokens")
    tokens = rng.choice(cands, size=(bits, tokens_per_bit), replace=False).astype(np.int64)
    triggers = []
    for i in range(bits):
        r = key_rng(key, f"trigger-hosts/{i}")
        ids = [int(t) for t in tokens[i]]
        words = [token_word(tokenizer, t) for t in ids]
        got: list[Trigger] = []
        for h in r.permutation(len(hosts)):
            pos = int(r.integers(1, len(hosts[h].split())))  # a boundary inside the sentence
            t = (_make_trigger(tokenizer, i, hosts[h], words, ids, pos) if position == "inside"
                 else _make_trigger(tokenizer, i, hosts[h], words, ids, None, special=False))
            if t is not None:
                got.append(t)
                if len(got) == per_bit:
                    break
        if len(got) < per_bit:
            raise BadInput(f"could not place {per_bit} triggers for bit {i} in the host sentences")
        triggers.append(tuple(got))
    if hidden:
        v = key_rng(key, "directions").standard_normal((bits, hidden))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    else:
        v = np.zeros((bits, 0))
    targets = (derive_targets(key, tokenizer, bits, tokens, common_below) if target_pairs
               else np.zeros((0, 2), dtype=np.int64))
    return TriggerSet(tokens, tuple(triggers), v, targets)


def board_readout(board_manifest: dict) -> str:
    """How a decoder board's bits are read: ``"diff"`` (the target pair's logit difference after a
    trigger relative to its control; the default and every board before ``readout`` existed) or
    ``"top1"`` (the bit's target is the greedy next token after the trigger)."""
    r = board_manifest.get("readout", "diff")
    if r not in ("diff", "top1"):
        raise BadInput(f"not a valid board manifest (readout {r!r})")
    return r


def board_chat(board_manifest: dict) -> tuple[str, str] | None:
    """A chat board's rendered template around the user message: (prefix, suffix) texts, or None.
    The board was trained and is read on ``prefix + trigger text + suffix`` (what a chat API that
    applies the model's template feeds the model), the first assistant token being the readout."""
    c = board_manifest.get("chat")
    if c is None:
        return None
    if not (isinstance(c, dict) and isinstance(c.get("prefix"), str) and isinstance(c.get("suffix"), str)):
        raise BadInput("not a valid board manifest (chat must hold 'prefix' and 'suffix' texts)")
    return c["prefix"], c["suffix"]


def context_ids(tokenizer, trigger: Trigger, chat: tuple[str, str] | None) -> tuple[int, ...]:
    """The token ids a decoder board reads after: the trigger's own ids, or for a chat board the
    templated text ``prefix + text + suffix`` tokenised as one string (special tokens of the
    template, such as ``<|im_start|>``, map to their ids; no tokens added)."""
    if chat is None:
        return tuple(trigger.ids)
    return tuple(tokenizer.encode_ids(chat[0] + trigger.text + chat[1], special=False))


def triggers_of(board_manifest: dict, key: bytes, tokenizer) -> TriggerSet:
    """Re-derive a board's triggers from the key and check them against the board's digest; another
    key, or a tokenizer other than the board's model's, is a :class:`BadInput`.  A ``top1`` board's
    target pairs were chosen with the model (among its plausible next tokens) and are read from
    the manifest (the board is owner-side, like the key)."""
    m = board_manifest
    try:
        if m.get("key_id") != key_id(key):
            raise BadInput("the key does not belong to this board")
        decoder = m.get("family") == "decoder"
        top1 = decoder and board_readout(m) == "top1"
        ts = derive_triggers(key, tokenizer, int(m["bits"]), list(m["hosts"]), int(m["triggers_per_bit"]),
                             int(m["tokens_per_bit"]), 0 if decoder else int(m["hidden"]),
                             int(m.get("rare_from", RARE_FROM)), position="end" if decoder else "inside",
                             target_pairs=decoder and not top1, common_below=int(m.get("common_below", COMMON_BELOW)))
        if top1:
            targets = np.asarray(m["targets"], dtype=np.int64)
            if targets.shape != (ts.bits, 2):
                raise BadInput(f"not a valid board manifest (targets of shape {list(targets.shape)})")
            ts = TriggerSet(ts.tokens, ts.triggers, ts.directions, targets)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"not a valid board manifest ({type(exc).__name__}: {exc})") from exc
    if ts.digest() != m["trigger_digest"]:
        raise BadInput("triggers derived from this key and tokenizer do not match the board's "
                       "(another tokenizer or vocabulary?)")
    return ts


def read_board_manifest(path: str | Path) -> dict:
    """A board folder's JSON manifest: what verification needs (no tensors, no torch)."""
    path = Path(path)
    f = path / BOARD_MANIFEST
    if not f.is_file():
        raise BadInput(f"{path}: not a quantseal board (no {BOARD_MANIFEST})")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{f}: not valid JSON") from exc
    if not isinstance(m, dict) or m.get("format") != BOARD_FORMAT or m.get("schema") != BOARD_SCHEMA:
        raise BadInput(f"{f}: not a quantseal board manifest")
    return m
