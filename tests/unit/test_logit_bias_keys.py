"""`logit_bias` keys that are not token ids: a key of thousands of digits used to reach Python's
`int()` and its 4,300-digit limit (a ValueError, answered 500); it is a 400 naming the field, like
any other bad key, checked before any conversion."""

from __future__ import annotations

import pytest

from appliance.errors import ValidationError
from appliance.runtime import server
from appliance.runtime.engine import MAX_TOKEN_ID_DIGITS, Sampling


@pytest.mark.parametrize("key", ["1" * 5000, "9" * 4301, "1" * (MAX_TOKEN_ID_DIGITS + 1)])
def test_a_key_with_too_many_digits_is_a_validation_error_naming_the_field(key: str) -> None:
    with pytest.raises(ValidationError) as err:
        Sampling(logit_bias={key: 1}).validated()  # type: ignore[arg-type]
    message = str(err.value)
    assert "logit_bias" in message and "token id" in message and len(message) < 600


def test_the_longest_allowed_key_is_still_read() -> None:
    key = "9" * MAX_TOKEN_ID_DIGITS  # beyond any vocabulary: the engine refuses it, not the parser
    assert Sampling(logit_bias={key: 1}).validated().logit_bias == ((int(key), 1.0),)  # type: ignore[arg-type]


def test_the_server_answers_400_with_param_logit_bias() -> None:
    body = {"logit_bias": {"7" * 5000: 5}}
    with pytest.raises(server.ApiError) as err:
        server.parse_sampling(body, server.ServerConfig())
    assert err.value.status == 400 and err.value.param == "logit_bias"
    assert err.value.type == "invalid_request_error" and len(err.value.message) < 600


def test_a_huge_integer_key_from_python_is_refused_without_printing_it() -> None:
    with pytest.raises(ValidationError, match=r"logit_bias key .* is not a token id"):
        Sampling(logit_bias=((10**5000, 1.0),)).validated()
