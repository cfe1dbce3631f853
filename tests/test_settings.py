import tomllib
import warnings

import pytest

from engine import settings as st


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_file_missing(tmp_path):
    s = st.load(tmp_path / "nope.toml")
    assert s.model.name == "" and s.gpus.inference == 0 and s.gpus.training == 1
    assert s.adapters_dir == tmp_path / "adapters"


def test_shipped_settings_load_and_paths_are_relative_to_file(settings, settings_path):
    assert settings.adapters_dir == settings_path.parent / "adapters"
    assert settings.history_db == settings_path.parent / "history.db"
    assert settings.profile("quick_test").max_steps == 30
    assert settings.profile("conservative").rank == 8


@pytest.mark.parametrize(
    "toml, key, expected",
    [
        ('[chat]\nreasoning = "extreme"', "chat.reasoning", "low, medium or high"),
        ("[gpus]\ninference = -1", "gpus.inference", "GPU index"),
        ('[gpus]\ntraining = "one"', "gpus.training", "integer"),
        ("[model]\nload_in_4bit = 1", "model.load_in_4bit", "true or false"),
        ('[model]\nlm_head_8bit = "yes"', "model.lm_head_8bit", "true or false"),
        ("[model]\nmax_seq_length = true", "model.max_seq_length", "integer"),
        ("[chat]\ntop_p = 1.5", "chat.top_p", "(0, 1]"),
        ("[training.profiles.quick_test]\nlearning_rate = 3", "training.profiles.quick_test.learning_rate", "(0, 1)"),
        ("[training.profiles.mine]\nrank = 4", "training.profiles.mine", "max_steps and max_samples"),
        ('[learning]\nnightly_window = "25:00-03:00"', "learning.nightly_window", "HH:MM-HH:MM"),
        ('[training]\ndefault_profile = "nope"', "training.default_profile", "quick_test"),
        ("[api]\nport = 70000", "api.port", "TCP port"),
        ('[api]\nhost = "a b"', "api.host", "address to bind"),
        ('[api]\ntoken = "short"', "api.token", "at least 16"),
        ("[api]\nmax_concurrent = 0", "api.max_concurrent", "1 to 1024"),
        ('[model]\nbackend = "ftp://x"', "model.backend", "http:// or https://"),
    ],
)
def test_bad_values_name_key_value_and_expectation(tmp_path, toml, key, expected):
    with pytest.raises(st.SettingsError) as err:
        st.load(write(tmp_path / "s.toml", toml))
    assert key in str(err.value) and expected in str(err.value)


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(st.SettingsError, match="not valid TOML"):
        st.load(write(tmp_path / "s.toml", "[model\nname="))


def test_unknown_key_warns_and_survives_a_write(tmp_path):
    path = write(tmp_path / "s.toml", '[model]\nname = "x"\nfuture_knob = 3\n[plugins]\na = 1\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = st.load(path)
    assert any("model.future_knob" in str(w.message) for w in caught)
    s2 = st.updated(s, "chat.temperature", "0.7")
    st.save(s2)
    data = tomllib.loads(path.read_text())
    assert data["model"]["future_knob"] == 3 and data["plugins"] == {"a": 1}
    assert data["chat"]["temperature"] == 0.7 and data["model"]["name"] == "x"
    assert st.load(path).chat.temperature == 0.7


def test_updated_rejects_bad_text_without_touching_the_file(settings, settings_path):
    before = settings_path.read_text()
    with pytest.raises(st.SettingsError, match="chat.max_new_tokens"):
        st.updated(settings, "chat.max_new_tokens", "lots")
    with pytest.raises(st.SettingsError, match="gpus.training"):
        st.updated(settings, "gpus.training", "-3")
    assert settings_path.read_text() == before


def test_env_var_points_at_another_file(settings_path):
    assert st.default_path() == settings_path.resolve()


def test_custom_profile_inherits_defaults(tmp_path):
    s = st.load(write(tmp_path / "s.toml", "[training.profiles.tiny]\nmax_steps = 3\nmax_samples = 8\n"))
    p = s.profile("tiny")
    assert (p.max_steps, p.max_samples, p.learning_rate) == (3, 8, 2e-4)
    with pytest.raises(st.SettingsError, match="known profiles"):
        s.profile("missing")


def test_saving_keeps_comments_order_and_layout(settings_path):
    before = settings_path.read_text()
    s = st.updated(st.load(settings_path), "chat.temperature", "0.5")
    st.save(s)
    after = settings_path.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("temperature = 0.5")
    assert not [p for p in settings_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert st.load(settings_path).chat.temperature == 0.5


def test_a_file_changed_since_it_was_read_is_not_overwritten(settings_path):
    """Two apps on one file: B saves temperature; A, which read the file before, must not put it back."""
    a = st.load(settings_path)
    b = st.load(settings_path)
    st.save(st.updated(b, "chat.temperature", "0.3"))
    with pytest.raises(st.SettingsChanged, match="changed on disk since it was read"):
        st.save(st.updated(a, "chat.top_p", "0.9"))
    assert st.load(settings_path).chat.temperature == 0.3 and st.load(settings_path).chat.top_p == 1.0
    again = st.updated(st.load(settings_path), "chat.top_p", "0.9")  # reload, then the change goes through
    st.save(again)
    st.save(st.updated(again, "chat.top_k", "7"))  # a second save from the same copy is not a conflict
    done = st.load(settings_path)
    assert (done.chat.temperature, done.chat.top_p, done.chat.top_k) == (0.3, 0.9, 7)


def test_a_new_profile_and_a_default_file_are_written_as_toml(tmp_path):
    path = tmp_path / "fresh.toml"
    s = st.updated(st.load(path), "training.profiles.mine", {"max_steps": 3, "max_samples": 10})
    st.save(s)
    again = st.load(path)
    assert again.training.profiles["mine"].max_steps == 3
    written = tomllib.loads(path.read_text())
    assert written["training"]["profiles"]["mine"]["max_steps"] == 3 and set(written) == {"training"}


def test_a_rejected_token_is_not_echoed(tmp_path):
    with pytest.raises(st.SettingsError) as err:
        st.load(write(tmp_path / "s.toml", '[api]\ntoken = "secret with space"'))
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("myhost", False), ("::", False)])
def test_only_loopback_addresses_count_as_local(host, loopback):
    assert st.is_loopback(host) is loopback
