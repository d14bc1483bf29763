"""app/gradio_sessions.py: a new Gradio session builds no block config until asked, and what the
deep-link path reads (``components``) is the same as Gradio's own eager version gives."""

from __future__ import annotations

import pytest
from gradio.state_holder import SessionState

from app import gradio_sessions


def test_the_replaced_gradio_code_is_the_known_version():
    # An upgraded Gradio changes these fingerprints: look at its SessionState again, then update them.
    assert gradio_sessions.fingerprints() == gradio_sessions.EXPECTED


@pytest.fixture(scope="module")
def demo(tmp_path_factory, builtin_backend):
    from app.config import AppConfig
    from app.ui import create_app

    blocks, services = create_app(AppConfig(data_dir=tmp_path_factory.mktemp("sessions")), builtin_backend)
    yield blocks
    services.close()


def test_a_new_session_builds_no_config_and_reads_the_same_as_gradios(demo):
    assert SessionState.__init__ is gradio_sessions._lazy_init  # create_app installed it
    lazy = SessionState(demo)
    assert lazy.config_values == {}  # the cost an API call no longer pays
    eager = SessionState.__new__(SessionState)
    gradio_sessions._ORIGINAL["__init__"](eager, demo)
    assert len(eager.config_values) > 100  # the whole page: what every call used to build
    assert list(lazy.components) == list(gradio_sessions._ORIGINAL["components"].fget(eager))


def test_a_value_update_builds_only_its_own_config(demo):
    from gradio.components import Textbox

    key, _box = next((k, b) for k, b in demo.blocks.items() if isinstance(b, Textbox))
    session = SessionState(demo)
    session._update_value_in_config(key, "hello")
    assert list(session.config_values) == [key]
    assert session.config_values[key]["props"]["value"] == "hello"
    assert SessionState(demo).config_values == {}  # another session does not see it
