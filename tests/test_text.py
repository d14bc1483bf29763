import pytest

from rlr_core.shapesworld import text


def test_known_prompt_is_canonicalised():
    assert text.check_prompt("A BIG red Circle in the middle,grey background") == (
        "a large red circle in the center, gray background"
    )


def test_unknown_words_are_named():
    with pytest.raises(text.UnknownWordsError) as err:
        text.check_prompt("a red dragon breathing fire")
    assert err.value.words == ["dragon", "breathing", "fire"]
    assert "dragon" in str(err.value) and "circle" in str(err.value)  # names the known words too


@pytest.mark.parametrize("prompt", ["", "   ", ",,,"])
def test_empty_prompt_is_refused_unless_allowed(prompt):
    with pytest.raises(text.PromptError, match="empty"):
        text.check_prompt(prompt)
    assert text.check_prompt(prompt, allow_empty=True) == ""


def test_overlong_prompts_are_refused():
    with pytest.raises(text.PromptError, match="characters"):
        text.check_prompt("a red circle " * 1000)
    with pytest.raises(text.PromptError, match="at most"):
        text.check_prompt("a red circle and a blue square and a green triangle on the left, white background")


def test_tokenizer_maps_every_grammar_word_to_its_own_id():
    tok = text.build_tokenizer()
    ids = tok("a small red circle on the left, navy background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert len(set(ids[1:-1])) == len(ids) - 2 - 0  # all words distinct here
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == (
        "a small red circle on the left, navy background"
    )


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = text.build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    prompt = "a large yellow triangle on the right"
    assert again(prompt).input_ids == tok(prompt).input_ids
    assert again.model_max_length == text.MAX_TOKENS
