"""``trimcpp serve``: llama-cpp-python's OpenAI-compatible server, with pruned images.

    trimcpp serve --model LLM.gguf --clip_model_path mmproj.gguf --chat_format trim-llava-1-5 [--keep 64]
    trimcpp serve --config_file models.yaml
    python -m trimcpp.serve ...

Every flag and config-file key of ``python -m llama_cpp.server`` works as there; trimcpp adds the
``trim-*`` chat formats with their pruning settings (:mod:`.settings`), safe image loading
(:mod:`.fetch`) and its chat route (:mod:`.app`). Needs the extra: ``pip install "trimcpp[server]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .app import TrimLlamaProxy, create_app
from .fetch import ImagePolicy, ImageRefused
from .settings import TRIM_FORMATS, TrimConfigFileSettings, TrimModelSettings, TrimServerSettings, TrimSettings

__all__ = ["ImagePolicy", "ImageRefused", "TRIM_FORMATS", "TrimLlamaProxy", "TrimModelSettings", "TrimServerSettings",
           "create_app", "load_settings", "main"]


def load_settings(args: argparse.Namespace) -> tuple[TrimServerSettings, list[TrimModelSettings]]:
    """The server's and the models' settings: from the config file (``--config_file`` or the
    ``CONFIG_FILE`` variable, JSON or YAML) if one is named, else from the flags (ValueError if invalid)."""
    from llama_cpp.server.cli import parse_model_from_args

    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if not config_file:
        return parse_model_from_args(TrimServerSettings, args), [parse_model_from_args(TrimModelSettings, args)]
    try:
        with open(config_file, "rb") as f:
            text = f.read()
    except OSError as error:
        raise ValueError(f"cannot read config file {config_file!r}: {error.strerror or error}") from None
    if config_file.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    config = TrimConfigFileSettings.model_validate(data)
    if not config.models:
        raise ValueError(f"config file {config_file!r} lists no models")
    return config, config.models


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``trimcpp serve``: exit status 2 for bad settings or a model that does not load."""
    import uvicorn
    from llama_cpp.server.cli import add_args_from_model

    parser = argparse.ArgumentParser(prog="trimcpp serve", description=__doc__.split("\n\n")[0].strip("`"))
    add_args_from_model(parser, TrimSettings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load (JSON or YAML).")
    args = parser.parse_args(argv)
    try:
        server, models = load_settings(args)
        app = create_app(server, models)
    except ValueError as error:
        print(f"trimcpp serve: error: {error}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=os.getenv("HOST", server.host), port=int(os.getenv("PORT", server.port)),
                ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile)
    return 0
