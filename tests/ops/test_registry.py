"""The impl registry: auto picks the best supported impl; a named unsupported impl raises."""

import pytest

from ssm_lab.ops import registry as reg


def make():
  r = reg.OpRegistry("toy")
  r.register(reg.Impl("slow", lambda: "slow", reg.always, auto_priority={"cpu": 1, "gpu": 1}))
  r.register(reg.Impl("fast", lambda: "fast",
                      lambda *, n: None if n % 2 == 0 else f"n={n} is odd",
                      auto_priority={"gpu": 5}))
  return r


def test_auto_prefers_priority_then_falls_back_when_unsupported():
  r = make()
  assert r.resolve("auto", backend="gpu", n=2).name == "fast"
  assert r.resolve("auto", backend="gpu", n=3).name == "slow"
  assert r.resolve("auto", backend="cpu", n=2).name == "slow"


def test_named_unsupported_impl_raises_with_reason():
  with pytest.raises(ValueError, match="n=3 is odd"):
    make().resolve("fast", backend="gpu", n=3)


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError, match="'fast', 'slow'"):
    make().resolve("nope", backend="cpu", n=2)


def test_auto_with_nothing_supported_says_why():
  r = reg.OpRegistry("toy")
  r.register(reg.Impl("only", lambda: 0, lambda **_: "never", auto_priority={"cpu": 1}))
  with pytest.raises(ValueError, match="only: never"):
    r.resolve("auto", backend="cpu")
