"""One-line errors for the two ways a backbone build fails on a user's machine: a timm model
name that does not exist, and ``MODEL.BACKBONE.PRETRAINED True`` without the weights (offline).

Source: ``timm.is_model`` / ``timm.list_models`` for names, ``difflib.get_close_matches`` for
the suggestions; the weights themselves are fetched by timm / torchvision as before.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterator

from ...utils.errors import ConfigError, MdkdError

__all__ = ["check_timm_name", "pretrained_weights_guard", "create_timm_model"]


def check_timm_name(name: str, key: str = "MODEL.BACKBONE.TIMM_NAME") -> None:
    """Raise a one-line :class:`ConfigError` if timm has no model ``name``, with close matches.

    Raises:
        ConfigError: ``"<key>: unknown timm model 'resnet5'; close matches: resnet50, ..."``.
    """
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ConfigError(f"{key}: unknown timm model '{name}'{hint}")


@contextlib.contextmanager
def pretrained_weights_guard(pretrained: bool, what: str) -> Iterator[None]:
    """Turn a failure to fetch pretrained weights into one :class:`ConfigError` line.

    Args:
        pretrained: the ``MODEL.BACKBONE.PRETRAINED`` value; when False nothing is caught.
        what: the model whose weights are fetched (for the message).

    Raises:
        ConfigError: ``MODEL.BACKBONE.PRETRAINED True: no <what> weights ...`` when the body
            raises anything but an :class:`MdkdError` while ``pretrained`` is set.
    """
    try:
        yield
    except MdkdError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        first = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"MODEL.BACKBONE.PRETRAINED True: could not load the pretrained {what} weights "
            f"({type(e).__name__}: {first}); offline, put them in the torch / Hugging Face cache "
            "first, or set MODEL.BACKBONE.PRETRAINED False (train from scratch)") from e


def create_timm_model(name: str, pretrained: bool, key: str = "MODEL.BACKBONE.TIMM_NAME", **kwargs):
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with the two checks above.

    Raises:
        ConfigError: unknown name (with close matches), or pretrained weights not available.
    """
    import timm

    check_timm_name(name, key)
    with pretrained_weights_guard(pretrained, f"timm '{name}'"):
        return timm.create_model(name, pretrained=pretrained, **kwargs)
