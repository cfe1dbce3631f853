from datetime import date

from hypothesis import given
from hypothesis import strategies as stx

from engine import harmony as h

TODAY = date(2026, 11, 24)


def test_prompt_layout_is_exactly_harmony():
    text = h.render_prompt(
        [h.Turn("user", "Hi"), h.Turn("assistant", "Hello", analysis="dropped"), h.Turn("user", "2+2?")],
        reasoning="high", instructions="Be brief.", today=TODAY,
    )
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-11-24\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello<|end|>"
        "<|start|>user<|message|>2+2?<|end|><|start|>assistant"
    )


def test_prefill_skips_reasoning():
    text = h.render_prompt([h.Turn("user", "x")], prefill=h.SKIP_REASONING_PREFILL, today=TODAY)
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>")


def test_training_example_puts_channels_in_the_completion():
    prompt, completion = h.render_example([h.Turn("user", "q"), h.Turn("assistant", "a", "think")], today=TODAY)
    assert prompt.endswith("<|start|>user<|message|>q<|end|><|start|>assistant")
    assert completion == ("<|channel|>analysis<|message|>think<|end|><|start|>assistant"
                          "<|channel|>final<|message|>a<|return|>")


def test_parse_full_completion_with_commentary_call():
    p = h.parse("<|channel|>analysis<|message|>look up<|end|>"
                "<|start|>assistant<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{}<|call|>")
    assert [(s.channel, s.text) for s in p.segments] == [("analysis", "look up"), ("commentary", "{}")]
    assert p.segments[1].recipient == "functions.weather" and p.done


def test_truncated_completion_keeps_partial_text():
    p = h.parse("<|channel|>analysis<|message|>thinking hard<|end|>"
                "<|start|>assistant<|channel|>final<|message|>The ans")
    assert p.analysis == "thinking hard" and p.final == "The ans"
    assert not p.segments[-1].complete and not p.done


def test_unknown_channel_and_stray_text_are_kept_raw():
    p = h.parse("<|channel|>banter<|message|>hello<|end|>oops<|start|>assistant<|channel|>final<|message|>ok<|return|>")
    assert [(s.channel, s.text, s.label) for s in p.segments] == [
        ("raw", "hello", "banter"), ("raw", "oops", None), ("final", "ok", None)]


def test_header_cut_short_is_kept():
    p = h.parse("<|channel|>analys")
    assert [(s.channel, s.text) for s in p.segments] == [("raw", "analys")]


def test_missing_end_before_next_header():
    p = h.parse("<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b<|return|>")
    assert (p.analysis, p.final, p.done) == ("a", "b", True)


plain = stx.text(stx.characters(blacklist_characters="<|>"), max_size=40)


@given(analysis=plain, final=plain, chunks=stx.lists(stx.integers(1, 7), min_size=1, max_size=30))
def test_render_parse_round_trip_in_any_chunking(analysis, final, chunks):
    text = h.render_completion(final, analysis)
    p, pos, i = h.HarmonyParser(), 0, 0
    while pos < len(text):
        step = chunks[i % len(chunks)]
        p.feed(text[pos : pos + step])
        pos, i = pos + step, i + 1
    p.finish()
    assert p.final == final and p.analysis == analysis and p.done


@given(stx.lists(stx.one_of(plain, stx.sampled_from((*h.SPECIAL_TOKENS, "analysis", "final"))), max_size=20))
def test_parser_never_loses_text(pieces):
    text = "".join(pieces)
    p = h.parse(text)
    kept = "".join((s.label or (s.channel if s.channel != "raw" else "")) + s.text for s in p.segments)
    # every character of the input but markup, spaces and the role word survives, in order
    def chars(t):
        return [c for c in h._MARKER.sub("", t).replace("assistant", "") if not c.isspace()]

    got = iter(chars(kept))
    assert all(any(c == g for g in got) for c in chars(text))


def test_unknown_channel_name_is_kept_as_the_label():
    """Found by the property above: a header naming no known channel lost its name."""
    [seg] = h.parse("<|channel|>0<|message|>hi").segments
    assert (seg.channel, seg.label, seg.text) == ("raw", "0", "hi")
