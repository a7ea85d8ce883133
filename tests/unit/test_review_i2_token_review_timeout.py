"""The TokenReview request timeout is a controller flag like the review caches: its value reaches the
authenticator the controller builds for ``--kube``, seen from outside against a fake API server that hangs."""

from __future__ import annotations

import pytest

from common import flags
from controller import node_auth
from controller.main import ControllerConfig
from tests.unit.test_ca_token_cache import Backend, backend, refusal
from tests.unit.test_controller_c_token_review_flags import authenticator

__all__ = ["backend"]  # the fake API server fixture, shared with the cache's own tests


def test_the_default_is_the_authenticators_own(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flags.parse(ControllerConfig, ["--kube"]).token_review_timeout_seconds == 10.0
    assert node_auth.REVIEW_TIMEOUT_SECONDS == 10.0
    monkeypatch.setenv("AMBIT_TOKEN_REVIEW_TIMEOUT_SECONDS", "2.5")
    assert flags.parse(ControllerConfig, ["--kube"]).token_review_timeout_seconds == 2.5


async def test_a_hung_api_server_is_given_up_on_after_the_flags_timeout(backend: Backend) -> None:
    auth = authenticator(backend, "--token-review-timeout-seconds", "0.3")
    assert auth.request_timeout == 0.3
    backend.gate.clear()  # the API server takes the review and never answers
    e = await refusal(auth, "agent-token")
    assert type(e) is node_auth.AuthBackendError and "timed out" in str(e).lower()
    assert backend.calls == 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_no_positive_number_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        flags.parse(ControllerConfig, ["--kube", "--token-review-timeout-seconds", value])
    assert exc.value.code == 2
    assert "--token-review-timeout-seconds: must be a positive number of seconds" in capsys.readouterr().err
