"""Each estimator's options dataclass is its one schema (rlr_core/estimators/schema.py): types,
ranges and choices come from the fields, values are checked with one-line errors, and the flat
round settings read and give back an estimator's public options."""

from __future__ import annotations

import pytest

from rlr_core.estimators import DDPO, ESTIMATORS, RLR, TruncatedBackprop, make_estimator
from rlr_core.estimators.schema import (
    OptionError,
    from_public,
    options_schema,
    parse_options,
    public_options,
    takes,
    to_public,
)


def spec(cls, name):
    return next(s for s in options_schema(cls) if s.name == name)


def test_types_choices_and_defaults_come_from_the_fields():
    block, rest, window = spec(RLR, "block"), spec(RLR, "rest"), spec(RLR, "window")
    assert (block.kind, block.words, block.default, block.public) == (int, ("auto",), 2, "block")
    assert (rest.kind, rest.choices) == (str, ("lr", "zo", "none"))
    assert (window.kind, window.count, window.optional, window.public) == (int, 2, True, None)
    steps = spec(TruncatedBackprop, "steps")
    assert (steps.public, steps.flag, steps.chain_steps, steps.default) == ("truncation", "truncate", True, 1)
    assert spec(DDPO, "whiten").kind is bool
    assert all(s.default == getattr(cls(), s.name) for cls in ESTIMATORS.values() for s in options_schema(cls))
    internal = {"chunk", "use_checkpoint", "temperature", "kl_steps"}  # knobs for code, not options
    assert not internal & {s.name for s in options_schema(RLR)}


def test_parse_options_checks_type_and_range():
    assert parse_options(RLR, {"block": " Auto ", "rest": "zo", "window": [2, 3], "tail": None}) == {
        "block": "auto", "rest": "zo", "window": (2, 3), "tail": None}
    assert parse_options(RLR, {"block": "3", "kl_coef": 1}) == {"block": 3, "kl_coef": 1.0}
    assert make_estimator("rlr", **parse_options(RLR, {"block": 3.0})) == RLR(block=3)
    for raw, match in [({"block": 0}, "HO block length h must be a whole number from 1 to 200 or auto, got 0"),
                       ({"block": 2.5}, "whole number"), ({"rest": "ho"}, "rest of the chain must be one of lr, zo"),
                       ({"kl_coef": -1}, "KL coefficient"), ({"kl_coef": float("nan")}, "KL coefficient"),
                       ({"branches": True}, "branches"), ({"window": [1]}, "block window"),
                       ({"chunk": 4}, "rlr takes no option chunk")]:
        with pytest.raises(OptionError, match=match):
            parse_options(RLR, raw)
    with pytest.raises(OptionError, match="whiten must be true or false"):
        parse_options(DDPO, {"whiten": "yes"})


def test_the_flat_settings_read_and_give_back_the_public_options():
    shared = public_options(ESTIMATORS.values())
    assert list(shared) == ["block", "rest", "kl_coef", "truncation"]
    assert set(shared["kl_coef"][1]) == set(ESTIMATORS)  # every estimator takes the KL
    flat = {"block": 3, "rest": "lr", "truncation": 9, "kl_coef": 0.0}
    assert from_public(RLR, flat, 10) == {"block": 3, "rest": "lr"}  # the KL at 0 is left out
    assert from_public(TruncatedBackprop, {**flat, "kl_coef": 0.5}, 4) == {"steps": 4, "kl_coef": 0.5}
    assert to_public(TruncatedBackprop, {"steps": 4}) == {"truncation": 4, "kl_coef": 0.0}
    assert from_public(DDPO, flat, 10) == {}


def test_capabilities_are_asked_of_the_class():
    assert takes(RLR, "window") and not any(takes(c, "window") for n, c in ESTIMATORS.items() if c is not RLR)
