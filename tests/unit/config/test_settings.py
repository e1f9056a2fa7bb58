"""Server settings: defaults < YAML file < LORASERVE_* environment < flags, validated."""

from __future__ import annotations

import argparse

import pytest

from loraserve.errors import ConfigError
from loraserve.settings import SETTINGS, add_flags, resolve


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def test_precedence_file_env_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: from-file\nport: 6000\nmax_loras: 3\nimport_roots: [/a, /b]\ndrain_timeout: 5\n")
    env = {"LORASERVE_PORT": "7000", "LORASERVE_PIN": "x,y"}
    s = resolve(_args("--config", str(config), "--max-loras", "6"), env)
    assert s.model == "from-file" and s.port == 7000 and s.max_loras == 6
    assert s.import_roots == ["/a", "/b"] and s.pin == ["x", "y"] and s.drain_timeout == 5.0
    assert s.metrics_port == 9400  # untouched default
    engine = s.engine_config()
    assert engine.max_loras == 6 and engine.base.model == "from-file"


@pytest.mark.parametrize("argv, env, words", [
    ((), {}, "no base model"),
    (("--model", "m", "--max-loras", "0"), {}, "max_loras"),
    (("--model", "m", "--quantization", "q2"), {}, "quantization"),
    (("--model", "m"), {"LORASERVE_PORT": "not-a-port"}, "LORASERVE_PORT"),
    (("--model", "m"), {"LORASERVE_ALLOW_OPEN_MANAGEMENT": "maybe"}, "LORASERVE_ALLOW_OPEN_MANAGEMENT.*bool"),
    (("--model", "m", "--tls-cert", "c.pem"), {}, "tls_cert and tls_key go together"),
    (("--model", "m", "--tls-client-ca", "ca.pem"), {}, "needs TLS"),
    (("--model", "m", "--refusal-hold", "-1"), {}, "refusal_hold must be in 0..60 seconds"),
    (("--model", "m"), {"LORASERVE_REFUSAL_HOLD": "600"}, "refusal_hold must be in 0..60 seconds.*600"),
    (("--model", "m", "--front-nice", "20"), {}, "front_nice must be in 0..19"),
])
def test_bad_settings_name_the_setting(argv, env, words):
    with pytest.raises(ConfigError, match=words):
        resolve(_args(*argv), env)


def test_unknown_file_keys_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nmax_lora: 3\n")
    with pytest.raises(ConfigError, match="unknown settings.*max_lora"):
        resolve(_args("--config", str(config)), {})


def test_every_setting_has_a_flag_with_its_default_and_env_in_help():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    text = parser.format_help()
    for s in SETTINGS:
        assert "--" + s.name.replace("_", "-") in text and f"LORASERVE_{s.name.upper()}" in text


def test_bool_settings_from_flags_env_and_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nallow_open_management: true\n")
    assert resolve(_args("--config", str(config)), {}).allow_open_management is True
    assert resolve(_args("--config", str(config)), {"LORASERVE_ALLOW_OPEN_MANAGEMENT": "off"}).allow_open_management \
        is False
    assert resolve(_args("--model", "m", "--allow-open-management"), {}).allow_open_management is True
    assert resolve(_args("--config", str(config), "--no-allow-open-management"), {}).allow_open_management is False
    assert resolve(_args("--model", "m"), {}).allow_open_management is False
