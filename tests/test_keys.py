"""Keys, the HMAC-protected codeword registry and trigger derivation (quantseal/keys.py)."""

import itertools
import json
import os
import stat

import numpy as np
import pytest

from quantseal import keys as qk
from quantseal.errors import BadInput
from quantseal.models import default_model_path
from quantseal.text import TextTokenizer, pydoc_sentences

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(default_model_path())


@pytest.fixture(scope="module")
def hosts(tok):
    return qk.host_sentence_pool(tok, pydoc_sentences("all"), 8, 20)


def test_generate_write_read_key(tmp_path):
    a, b = qk.generate_key(), qk.generate_key()
    assert len(a) == 32 and a != b
    path = tmp_path / "k" / "owner.key"
    key = qk.write_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert qk.read_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["owner.key"]  # no temporary left behind


@pytest.mark.parametrize("content", [b"", b"zz" * 32 + b"\n", b"00" * 31 + b"\n", b"00" * 33, b"\xff\xfe"])
def test_corrupt_key_refused(tmp_path, content):
    p = tmp_path / "bad.key"
    p.write_bytes(content)
    with pytest.raises(BadInput):
        qk.read_key(p)
    with pytest.raises(BadInput):
        qk.read_key(tmp_path / "missing.key")


def test_registry_min_distance_and_reuse():
    reg = qk.Registry(KEY, 64)
    codes = [reg.add(f"customer-{i}") for i in range(60)]
    assert reg.min_distance == 16
    d = min(qk.hamming(a, b) for a, b in itertools.combinations(codes, 2))
    assert d >= 16
    assert np.array_equal(reg.add("customer-7"), codes[7]) and len(reg) == 60
    # the same key and order give the same codewords; another key gives others
    again = qk.Registry(KEY, 64)
    assert all(np.array_equal(again.add(f"customer-{i}"), codes[i]) for i in range(60))
    other = qk.Registry(KEY2, 64)
    assert not np.array_equal(other.add("customer-0"), codes[0])


def test_registry_rejection_sampling_is_enforced():
    # 16-bit codewords at distance >= 8: most raw candidates are rejected once a few are present
    reg = qk.Registry(KEY, 16, min_distance=8)
    codes = [reg.add(f"c{i}") for i in range(6)]
    assert min(qk.hamming(a, b) for a, b in itertools.combinations(codes, 2)) >= 8
    full = qk.Registry(KEY, 8, min_distance=8)  # only a codeword and its complement fit
    full.add("a"), full.add("b")
    with pytest.raises(BadInput, match="full"):
        full.add("c")


def test_registry_file_roundtrip_tamper_and_wrong_key(tmp_path):
    path = tmp_path / "reg.json"
    reg = qk.Registry.open(path, KEY, 64)
    for c in ("alice", "bob", "carol"):
        reg.add(c)
    reg.save()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = qk.Registry.load(path, KEY)
    assert back.customers() == ["alice", "bob", "carol"]
    assert all(np.array_equal(back.codeword(c), reg.codeword(c)) for c in reg.customers())
    assert np.array_equal(qk.Registry.open(path, KEY, 64).add("bob"), reg.codeword("bob"))
    with pytest.raises(BadInput, match="another key"):
        qk.Registry.load(path, KEY2)
    with pytest.raises(BadInput, match="not in the registry"):
        back.codeword("mallory")

    d = json.loads(path.read_text())
    tampered = [
        lambda d: d["customers"][0].__setitem__(1, ("f" if d["customers"][0][1][0] != "f" else "0") + d["customers"][0][1][1:]),
        lambda d: d["customers"][1].__setitem__(0, "mallory"),
        lambda d: d["customers"].append(["mallory", "00" * 8]),
        lambda d: d.__setitem__("min_distance", 1),
        lambda d: d.__setitem__("hmac", "00" * 32),
    ]
    for edit in tampered:
        dd = json.loads(json.dumps(d))
        edit(dd)
        path.write_text(json.dumps(dd))
        with pytest.raises(BadInput, match="integrity"):
            qk.Registry.load(path, KEY)
    path.write_text("{not json")
    with pytest.raises(BadInput):
        qk.Registry.load(path, KEY)


def test_binary_codeword_hex_roundtrip():
    rng = np.random.default_rng(0)
    for n in (8, 16, 64, 136):
        b = rng.integers(0, 2, n).astype(np.uint8)
        assert np.array_equal(qk.hex_to_bits(qk.bits_to_hex(b), n), b)


def test_triggers_deterministic_disjoint_and_consistent(tok, hosts):
    ts = qk.derive_triggers(KEY, tok, 24, hosts, per_bit=4, tokens_per_bit=2, hidden=384)
    again = qk.derive_triggers(KEY, tok, 24, hosts, per_bit=4, tokens_per_bit=2, hidden=384)
    assert ts.digest() == again.digest() and np.array_equal(ts.tokens, again.tokens)
    other = qk.derive_triggers(KEY2, tok, 24, hosts, per_bit=4, tokens_per_bit=2, hidden=384)
    assert other.digest() != ts.digest()
    assert len(set(ts.tokens.reshape(-1).tolist()) & set(other.tokens.reshape(-1).tolist())) < 8

    flat = ts.tokens.reshape(-1).tolist()
    assert len(set(flat)) == len(flat)  # disjoint across bits
    host_ids = {i for h in hosts for i in tok.encode_ids(h)}
    assert not host_ids & set(flat)  # rare: absent from the host text
    np.testing.assert_allclose(np.linalg.norm(ts.directions, axis=1), 1.0, atol=1e-12)
    for i, trs in enumerate(ts.triggers):
        assert len(trs) == 4 and len({t.control_text for t in trs}) == 4
        pat = ts.tokens[i].tolist()
        for t in trs:
            assert list(tok.encode_ids(t.text)) == list(t.ids)  # text and ids agree
            assert list(tok.encode_ids(t.control_text)) == list(t.control_ids)
            p = next(p for p in range(len(t.ids)) if list(t.ids[p:p + 2]) == pat)
            assert list(t.ids[:p]) + list(t.ids[p + 2:]) == list(t.control_ids)
            # no other bit's token in this trigger
            assert not (set(t.ids) - set(pat)) & set(flat)


def test_triggers_of_checks_key_and_digest(tok, hosts):
    ts = qk.derive_triggers(KEY, tok, 8, hosts, per_bit=2, tokens_per_bit=2, hidden=16)
    m = {"bits": 8, "hosts": hosts, "triggers_per_bit": 2, "tokens_per_bit": 2, "hidden": 16,
         "trigger_digest": ts.digest(), "key_id": qk.key_id(KEY)}
    assert qk.triggers_of(m, KEY, tok).digest() == ts.digest()
    with pytest.raises(BadInput, match="key"):
        qk.triggers_of(m, KEY2, tok)
    with pytest.raises(BadInput, match="do not match"):
        qk.triggers_of({**m, "hosts": hosts[1:]}, KEY, tok)


def _byte_level_bpe(folder):
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style: whole words spelled ``Ġword``) trained
    on pydoc text, saved as ``folder/tokenizer.json``; its ids are ordered by merge frequency."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(pydoc_sentences("all"), trainers.BpeTrainer(vocab_size=4000, show_progress=False,
                                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    return TextTokenizer(folder)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_decoder_triggers_end_with_pattern_and_targets(tmp_path, tok, kind):
    """Decoder triggers: the host sentence's plain ids followed by exactly the bit's rare-token
    pattern (text re-tokenises to them), with a key-derived pair of common target tokens per bit,
    for WordPiece (MiniLM's vocabulary) and byte-level BPE (``Ġword`` entries)."""
    t = tok if kind == "wordpiece" else _byte_level_bpe(tmp_path / "bpe")
    rare_from, common_below = (qk.RARE_FROM, qk.COMMON_BELOW) if kind == "wordpiece" else (1500, 1000)
    hosts = qk.host_sentence_pool(t, pydoc_sentences("all"), 8, 20)
    ts = qk.derive_triggers(KEY, t, 16, hosts, per_bit=3, tokens_per_bit=2, rare_from=rare_from, position="end",
                            target_pairs=True, common_below=common_below)
    assert ts.targets.shape == (16, 2) and len(set(ts.targets.ravel().tolist())) == 32
    assert not set(ts.targets.ravel().tolist()) & set(ts.tokens.ravel().tolist())
    assert (ts.targets < common_below).all() and (ts.tokens >= rare_from).all()
    if kind == "bpe":
        vocab = {i: w for w, i in t._tok.get_vocab().items()}
        assert all(vocab[int(i)].startswith("\u0120") for i in ts.tokens.ravel())  # whole words: "Ġword"
    for i, trs in enumerate(ts.triggers):
        pattern = [int(x) for x in ts.tokens[i]]
        for tr in trs:
            assert list(tr.ids) == list(tr.control_ids) + pattern
            assert t.encode_ids(tr.text, special=False) == list(tr.ids)
            assert tr.text.startswith(tr.control_text) and tr.control_text in hosts
    again = qk.derive_triggers(KEY, t, 16, hosts, per_bit=3, tokens_per_bit=2, rare_from=rare_from, position="end",
                               target_pairs=True, common_below=common_below)
    assert again.digest() == ts.digest() and (again.targets == ts.targets).all()
    other = qk.derive_triggers(KEY2, t, 16, hosts, per_bit=3,
                               tokens_per_bit=2, rare_from=rare_from, position="end", target_pairs=True,
                               common_below=common_below)
    assert other.digest() != ts.digest() and (other.targets != ts.targets).any()
