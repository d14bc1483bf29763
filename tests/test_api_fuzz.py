"""Every API endpoint of a running public app, called with arbitrary JSON values (hypothesis):
each call either works or is refused with a message for the user (a ``gr.Error``), never with
an unexpected exception, and the app is healthy afterwards. Bounded to 6 examples per endpoint (about half a minute)."""

from __future__ import annotations

import pytest

from tests.conftest import PUBLIC_ADMIN_PASSWORD

gradio_client = pytest.importorskip("gradio_client")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ClientError = gradio_client.exceptions.AppError
PASSWORD = PUBLIC_ADMIN_PASSWORD  # the public_app fixture's (tests/conftest.py)
PER_ENDPOINT = 6  # examples per endpoint (endpoints without parameters get one)
# What gradio_client says when the server raised anything but a gr.Error (a bug).
UNEXPECTED = "has not enabled verbose error reporting"

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
           | st.sampled_from(["a red circle", "a small blue square, white background", "left", "rlr",
                              "all", "mid", "", " ", "\x00", "../../feedback.db", "rt-" + "0" * 32]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["steps", "path", "seed"]),
                                      inner, max_size=4), max_leaves=10)


@pytest.fixture(scope="module")
def app(public_app):
    return public_app


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def endpoints(client) -> dict[str, tuple[int, int]]:
    """Endpoint -> (required, total) parameter counts, from the app's own API description."""
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    return {name: (sum(not p["parameter_has_default"] for p in ep["parameters"]), len(ep["parameters"]))
            for name, ep in named.items()}


def test_every_endpoint_is_fuzzed(endpoints):
    assert len(endpoints) >= 22 and "/rate" in endpoints and "/import_data" in endpoints


def test_arbitrary_json_gets_an_answer_or_a_message(app, client, endpoints):
    token = client.predict(api_name="/rater_token")["rater_token"]
    app.services.generation.generate("a red circle", 2, 0, 3, 3.0)  # something to rate and compare
    calls = 0

    def fuzz(name: str, required: int, total: int) -> None:
        @settings(max_examples=PER_ENDPOINT, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(args=st.lists(JSON, min_size=required, max_size=total))
        def call_one(args):
            nonlocal calls
            calls += 1
            try:
                client.predict(*args, api_name=name)
            except ClientError as err:
                assert UNEXPECTED not in str(err) and str(err).strip(), (name, args, str(err))

        call_one()

    for name, (required, total) in sorted(endpoints.items()):
        fuzz(name, required, total)
    assert calls >= len(endpoints) * 2

    # Healthy after: it answers, draws, takes a rating, and its store is intact.
    assert client.predict(api_name="/train_status")["state"] in ("idle", "finished", "failed", "stopped")
    sample = client.predict("a red circle", 1, 5, 3, 3.0, api_name="/generate")[0]
    assert client.predict(sample["sample_id"], 4, token, api_name="/rate")["stars"] == 4
    assert app.services.store.verify(check_hashes=True) == []
