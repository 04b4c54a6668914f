"""Which query function verification gets for an HTTP suspect: the API × board family table, and
the decoder bookkeeping (each sequence's text and the bits it serves) from the key's triggers."""

from __future__ import annotations

import pytest

from quantseal import keys as qk
from quantseal.errors import BadInput
from quantseal.models import default_model_path
from quantseal.runtime.client import EndpointCausalLM, EndpointEmbedder
from quantseal.runtime.openai_client import OpenAIEmbeddings, OpenAITargets, api_base
from quantseal.runtime.suspects import decoder_texts, decoder_uses, endpoint_query
from quantseal.text import TextTokenizer, pydoc_sentences

KEY = bytes(range(32))
URL = "http://127.0.0.1:9"  # nothing is queried here


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(default_model_path())


def _manifest(tok, decoder: bool) -> tuple[dict, qk.TriggerSet]:
    hosts = qk.host_sentence_pool(tok, pydoc_sentences("all"), 8, 20, limit=60)
    ts = qk.derive_triggers(KEY, tok, 8, hosts, per_bit=3, tokens_per_bit=2, hidden=0 if decoder else 16,
                            position="end" if decoder else "inside", target_pairs=decoder)
    m = {"format": qk.BOARD_FORMAT, "schema": qk.BOARD_SCHEMA, "bits": 8, "hosts": hosts, "triggers_per_bit": 3,
         "tokens_per_bit": 2, "hidden": 0 if decoder else 16, "trigger_digest": ts.digest(), "key_id": qk.key_id(KEY)}
    if decoder:
        m["family"] = "decoder"
    return m, ts


def test_api_table(tok):
    enc, _ = _manifest(tok, False)
    dec, _ = _manifest(tok, True)
    fn, inputs, probe = endpoint_query(URL, "quantseal", enc, KEY, tok, timeout=3)
    assert isinstance(fn.__self__, EndpointEmbedder) and inputs == "ids" and probe is None
    fn, inputs, probe = endpoint_query(URL, "quantseal", dec, KEY, tok)
    assert isinstance(fn.__self__, EndpointCausalLM) and inputs == "ids"
    fn, inputs, probe = endpoint_query(URL + "/v1/embeddings", "openai-embeddings", enc, KEY, tok, model="m")
    assert isinstance(fn, OpenAIEmbeddings) and inputs == "text" and fn.transport.base == URL
    for api in ("openai-completions", "openai-chat"):
        fn, inputs, probe = endpoint_query(URL + "/v1", api, dec, KEY, tok, qps=2.0)
        assert isinstance(fn, OpenAITargets) and fn is probe and fn.api == api.removeprefix("openai-")
        assert fn.transport.qps == 2.0
    for api, board, msg in (("openai-chat", enc, "openai-embeddings"), ("openai-embeddings", dec, "openai-chat"),
                            ("graphql", enc, "unknown --api")):
        with pytest.raises(BadInput, match=msg):
            endpoint_query(URL, api, board, KEY, tok)
    with pytest.raises(BadInput, match="key"):
        endpoint_query(URL, "openai-chat", dec, bytes(range(1, 33)), tok)
    assert api_base("http://h:1/v1/chat/completions/") == api_base("http://h:1/v1") == "http://h:1"


def test_decoder_texts_and_uses(tok):
    _, ts = _manifest(tok, True)
    texts, uses = decoder_texts(ts), decoder_uses(ts)
    assert set(texts) == set(uses)
    for i, trs in enumerate(ts.triggers):
        for t in trs:
            assert texts[tuple(t.ids)] == t.text and uses[tuple(t.ids)] == {i}
            assert texts[tuple(t.control_ids)] == t.control_text and i in uses[tuple(t.control_ids)]
            # the text is what the suspect tokenises: exactly the queried ids
            assert tok.encode_ids(t.text, special=False) == list(t.ids)
    assert sum(len(b) for b in uses.values()) <= 2 * 8 * 3


def test_top1_chat_board_texts(tok):
    """A top1 chat board: the chat API gets each trigger's text (the server templates it), the
    completions API the templated text itself, both keyed by the templated ids verification asks
    for; no controls, one bit per sequence; the probe reads without logit_bias, a text answer
    worth one margin.  The manifest's target pairs are used, and a misshapen list is refused."""
    from quantseal.runtime.suspects import top1_texts
    from quantseal.runtime.verify import decoder_contexts

    m, ts = _manifest(tok, False)
    m["family"], m["hidden"] = "decoder", 0
    targets = [[2000 + 2 * i, 2001 + 2 * i] for i in range(8)]
    chat = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    m.update(readout="top1", targets=targets, chat={"prefix": chat[0], "suffix": chat[1]}, margin=1.5)
    ts = qk.derive_triggers(KEY, tok, 8, m["hosts"], per_bit=3, tokens_per_bit=2, position="end")
    m["trigger_digest"] = qk.TriggerSet(ts.tokens, ts.triggers, ts.directions, qk.np.array(targets)).digest()
    got = qk.triggers_of(m, KEY, tok)
    assert got.targets.tolist() == targets
    ctx = decoder_contexts(m, got, tok)
    for api in ("chat", "completions"):
        texts, uses = top1_texts(m, got, tok, api)
        assert len(texts) == len(uses) == 8 * 3
        for i, trs in enumerate(got.triggers):
            for j, t in enumerate(trs):
                c = ctx[i][j]
                assert uses[c] == {i} and list(c) == tok.encode_ids(chat[0] + t.text + chat[1], special=False)
                assert texts[c] == (t.text if api == "chat" else chat[0] + t.text + chat[1])
    fn, _, probe = endpoint_query(URL, "openai-chat", m, KEY, tok)
    assert fn.logit_bias is False and fn.text_unit == 1.5
    with pytest.raises(BadInput, match="targets"):
        qk.triggers_of({**m, "targets": targets[:3]}, KEY, tok)
