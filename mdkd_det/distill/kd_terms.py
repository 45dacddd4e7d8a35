"""``KD_LOSS_REGISTRY``: KD terms as registered objects (issue 15; docs/kd_terms.md).

A KD term is a :class:`KDTerm`: its loss-dict key (the paper's name, ``"loss_Con"``), the
:class:`~mdkd_det.distill.adapters.KDInputs` fields it reads, its weight key under ``cfg.KD`` and
default weight, the student-side connector it needs, and a loss function ``loss(ctx) -> Tensor``
that reads a :class:`KDContext` and calls a pure function of :mod:`mdkd_det.distill.losses`. The
:class:`~mdkd_det.distill.distiller.Distiller` iterates over the configured terms, multiplies each
by its weight and cf(epoch), and computes nothing for a term whose weight is 0.

Built-in terms (registry name -> key): the paper's ``con falgn cos att clskd roikd kld``
(``KD.TERMS`` default, in this order) and the related papers' ``kmm`` (002), ``dcgd`` and
``msan`` (001), ``hint`` and ``ctx`` (004), ``lm`` and ``aam`` (002, segmentation), off by
default (weight 0.0).

Third-party terms: a package declares, in its ``pyproject.toml``::

    [project.entry-points."mdkd_det.kd_losses"]
    my_term = "my_pkg.kd:MY_TERM"          # a KDTerm instance

    [project.entry-points."mdkd_det.config"]
    my_term = "my_pkg.kd:add_config"       # adds cfg.KD.W_MY_TERM (default 0.0) and options

The KD term group is loaded once, when the registry is first iterated (at Distiller build); the
config group by :func:`mdkd_det.config.get_cfg` (the existing config-plugin mechanism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..modeling.registry import Registry
from . import losses as L

KD_LOSS_REGISTRY = Registry("KD_LOSS", entry_point_group="mdkd_det.kd_losses")
KD_LOSS_REGISTRY.__doc__ = """KD terms: name -> :class:`KDTerm` (``register_kd_term``)."""

#: the KDInputs fields a term may read ("pooled" = GAP of the paired feature levels).
FIELDS = ("features", "pooled", "region_logits", "region_embeddings", "logits", "images",
          "pixel_logits")
#: student-side connectors a term may need (A3): 1x1 conv per level, Linear on RoI embeddings,
#: MSAN latent head per level (001).
CONNECTORS = (None, "feature", "embedding", "latent")
#: the paper's terms, in the order of Eq. 24 / Eq. 16: the default of ``KD.TERMS``.
DEFAULT_TERMS = ("con", "falgn", "cos", "att", "clskd", "roikd", "kld")


@dataclass(frozen=True)
class KDTerm:
    """One registered KD term.

    Attributes:
        key: loss-dict key, named as in the paper (``"loss_Con"``); logged as its own entry.
        reads: :data:`FIELDS` it reads. Fields other than features/pooled must be present (not
            None) on both sides (``images``: the student's), otherwise the term is skipped for
            the step (e.g. ClsKD without regions).
        weight_key: its weight under ``cfg.KD`` (``"W_CON"``).
        default_weight: the weight when the config has no such key (built-ins: equal to the
            default in defaults.py; a plugin should use 0.0 so installing it changes no run).
        connector: one of :data:`CONNECTORS`.
        loss: ``loss(ctx: KDContext) -> 0-dim Tensor`` (unweighted).
        source: paper and equation numbers, e.g. ``"000 Eq. 11"``.
    """

    key: str
    reads: Tuple[str, ...]
    weight_key: str
    default_weight: float
    connector: Optional[str]
    loss: Callable[["KDContext"], torch.Tensor]
    source: str = ""

    def __post_init__(self) -> None:
        bad = [f for f in self.reads if f not in FIELDS]
        if bad or self.connector not in CONNECTORS:
            raise ValueError(f"KDTerm {self.key!r}: unknown fields {bad} (known {list(FIELDS)}) or "
                             f"connector {self.connector!r} (known {list(CONNECTORS)})")

    def __call__(self, ctx: "KDContext") -> torch.Tensor:
        """``loss(ctx)``; being callable, a KDTerm named by an entry point is registered under
        the entry point's name by :meth:`Registry.load_plugins`."""
        return self.loss(ctx)

    def available(self, s, t) -> bool:
        """True when every optional field it reads is present in ``s`` (and ``t``)."""
        for f in self.reads:
            if f in ("features", "pooled"):
                continue
            if getattr(s, f, None) is None or (f != "images" and getattr(t, f, None) is None):
                return False
        return True


def register_kd_term(name: str, term: KDTerm) -> KDTerm:
    """Register ``term`` under ``name`` (the name ``KD.TERMS`` uses); returns it.

    Raises:
        AssertionError: (fvcore) the name is taken.
    """
    KD_LOSS_REGISTRY.register(name)(term)
    return term


def get_term(name: str) -> KDTerm:
    """The term registered as ``name`` (plugins loaded on a miss).

    Raises:
        RegistryError: unknown name (lists the registered ones).
    """
    term = KD_LOSS_REGISTRY.get(name)
    if not isinstance(term, KDTerm):
        raise TypeError(f"KD term {name!r} is a {type(term).__name__}, not a KDTerm")
    return term


def registered_terms() -> List[Tuple[str, KDTerm]]:
    """``(name, term)`` of every registered term, built-ins first (registration order), then
    the entry-point plugins (loaded once)."""
    return [(n, t) for n, t in KD_LOSS_REGISTRY if isinstance(t, KDTerm)]


def term_weights(kd) -> Dict[str, float]:
    """``{name: weight}`` of every registered term from a ``KD`` config node
    (``kd.<weight_key>``, or the term's default weight when the key is absent)."""
    return {n: float(getattr(kd, t.weight_key, t.default_weight)) for n, t in registered_terms()}


def resolve_terms(terms: Optional[Sequence[str]], weights: Mapping[str, float]) -> Tuple[str, ...]:
    """The terms a Distiller computes, in order: ``terms`` (``KD.TERMS``; None = the paper's
    seven), then every other registered term whose weight is non-zero (D15.1: a related
    method is switched on by its weight key alone).

    Raises:
        RegistryError: a name in ``terms`` or ``weights`` is not registered.
    """
    listed = tuple(DEFAULT_TERMS if terms is None else terms)
    for n in list(listed) + list(weights):
        get_term(n)
    extra = tuple(n for n, _ in registered_terms() if n not in listed and weights.get(n, 0.0))
    return listed + extra


class KDContext:
    """What a term's loss reads in one KD step (lazily computed, cached per step).

    Attributes:
        s, t: student / teacher :class:`KDInputs`; ``T``: temperature at this epoch;
        ``epoch``; ``distiller`` (connectors, level pairs, options, teacher, student backbone).

    Properties (per paired level, in ``distiller.level_pairs`` order):
        ``s_raw`` student maps [B, C_s, H, W]; ``t_feats`` teacher maps; ``s_feats`` the student
        maps through the feature connectors (C_t channels); ``s_pooled_raw``, ``s_pooled``,
        ``t_pooled`` their GAP [B, C]; ``s_emb`` RoI embeddings through the embedding connector.
    """

    def __init__(self, distiller, s, t, T: float, epoch: float) -> None:
        self.distiller, self.s, self.t, self.T, self.epoch = distiller, s, t, float(T), float(epoch)
        self._cache: Dict[str, Any] = {}

    def _get(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def options(self):
        """The distiller's loss options (``kl_direction``, ``reduction``, ``cls_kind``,
        ``con_mask_diag``, ``kd_options`` for the related terms)."""
        return self.distiller

    @property
    def cfg(self):
        """The ``KD`` config node the distiller was built from (a plugin term reads its own keys
        here, e.g. ``ctx.cfg.TOY.SCALE``); None for a Distiller built without a config."""
        return self.distiller.kd_options.get("cfg")

    @property
    def s_raw(self) -> List[torch.Tensor]:
        return self._get("s_raw", lambda: [self.s.features[sl] for sl in self.distiller.level_pairs])

    @property
    def t_feats(self) -> List[torch.Tensor]:
        return self._get("t_feats", lambda: [self.t.features[tl] for tl in self.distiller.level_pairs.values()])

    @property
    def s_feats(self) -> List[torch.Tensor]:
        conn = self.distiller.connectors
        return self._get("s_feats", lambda: [conn[sl](f) for sl, f in zip(self.distiller.level_pairs, self.s_raw)])

    @property
    def t_pooled(self) -> List[torch.Tensor]:
        return self._get("t_pooled", lambda: [f.mean(dim=(2, 3)) for f in self.t_feats])

    @property
    def s_pooled_raw(self) -> List[torch.Tensor]:
        return self._get("s_pooled_raw", lambda: [f.mean(dim=(2, 3)) for f in self.s_raw])

    @property
    def s_pooled(self) -> List[torch.Tensor]:
        return self._get("s_pooled", lambda: [f.mean(dim=(2, 3)) for f in self.s_feats])

    @property
    def s_emb(self) -> torch.Tensor:
        return self._get("s_emb", lambda: self.distiller.roi_connector(self.s.region_embeddings))

    def late(self, values: Sequence[Any]) -> List[Any]:
        """The last ``KD.LATE_LEVELS`` entries of a per-level list (the coarsest, deepest level
        pairs: CMEDL's "last two layers", paper 004)."""
        k = int(self.distiller.kd_options.get("late_levels", 2))
        return list(values)[-k:] if k > 0 else list(values)

    def view_latents(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """DCGD latents ``(z_s [V, B, D], z_t [V, B, D])`` per level, stacked over levels as
        lists: view 0 = this step's batch, views 1.. = :func:`photometric_views` of the
        student's normalised batch run through both backbones (D15.5)."""
        return self._get("view_latents", lambda: self.distiller.view_latents(self))


# --------------------------------------------------------------------------------------------
# the paper's terms (000): the loss functions read L.* at call time (tests may patch them)
# --------------------------------------------------------------------------------------------
def _con(c: KDContext):
    o = c.options
    return L.con(c.s_pooled_raw, c.t_pooled, T=c.T, direction=o.kl_direction, mask_diag=o.con_mask_diag)


def _falgn(c: KDContext):
    return L.falgn(c.s_feats, c.t_feats, reduction=c.options.reduction)


def _cos(c: KDContext):
    return L.cos_sim(c.s_pooled, c.t_pooled, reduction=c.options.reduction)


def _att(c: KDContext):
    return L.att(c.s_raw, c.t_feats)


def _clskd(c: KDContext):
    o = c.options
    return L.cls_kd(c.s.region_logits, c.t.region_logits, T=c.T, kind=o.cls_kind, direction=o.kl_direction)


def _roikd(c: KDContext):
    return L.roi_kd(c.s_emb, c.t.region_embeddings, reduction=c.options.reduction)


def _kld(c: KDContext):
    return L.kld(c.s.logits, c.t.logits, T=c.T, direction=c.options.kl_direction)


register_kd_term("con", KDTerm("loss_Con", ("pooled",), "W_CON", 0.005, None, _con, "000 Eq. 11 (A1)"))
register_kd_term("falgn", KDTerm("loss_FAlgn", ("features",), "W_FALGN", 0.03, "feature", _falgn, "000 Eq. 12"))
register_kd_term("cos", KDTerm("loss_CosSim", ("pooled",), "W_COS", 0.03, "feature", _cos, "000 Eq. 13"))
register_kd_term("att", KDTerm("loss_Att", ("features",), "W_ATT", 0.01, None, _att, "000 Eqs. 19-21"))
register_kd_term("clskd", KDTerm("loss_ClsKD", ("region_logits",), "W_CLSKD", 1.0, None, _clskd, "000 Eq. 22"))
register_kd_term("roikd", KDTerm("loss_ROIKD", ("region_embeddings",), "W_ROIKD", 0.10, "embedding", _roikd,
                                 "000 Eq. 23"))
register_kd_term("kld", KDTerm("loss_KLD", ("logits",), "W_KLD", 0.0, None, _kld, "000 Eq. 15"))


# --------------------------------------------------------------------------------------------
# related papers 001, 002, 004 (off by default: weight 0.0)
# --------------------------------------------------------------------------------------------
def _kmm(c: KDContext):
    return L.kmm(c.s_pooled_raw, c.t_pooled, reduction=c.options.reduction)


def _dcgd(c: KDContext):
    z_s, z_t = c.view_latents()
    w = float(c.options.kd_options.get("dcgd_inter_weight", 1.0))
    return sum(L.dcgd(a, b, inter_weight=w) for a, b in zip(z_s, z_t)) / len(z_s)


def _msan(c: KDContext):
    heads = c.distiller.latent_heads
    lam = float(c.options.kd_options.get("msan_lambda", 0.5))
    total = 0.0
    for sl, f, tp in zip(c.distiller.level_pairs, c.s_raw, c.t_pooled):
        f = f.detach()  # the heads learn here; the student is reached only through DCGD (D15.6)
        z, f_hat = heads[sl](f)
        total = total + L.msan(f, f_hat, torch.nn.functional.normalize(z, dim=1),
                               torch.nn.functional.normalize(tp.float(), dim=1), lam=lam)
    return total / len(c.s_raw)


def _hint(c: KDContext):
    return L.falgn(c.late(c.s_feats), c.late(c.t_feats), reduction=c.options.reduction)


def _ctx(c: KDContext):
    o = c.options.kd_options
    return L.contextual(c.late(c.s_feats), c.late(c.t_feats), h=float(o.get("ctx_bandwidth", 0.5)),
                        positions=int(o.get("ctx_positions", 256)))


def _lm(c: KDContext):
    return L.pixel_kl(c.s.pixel_logits, c.t.pixel_logits, T=1.0, direction="s||t")


def _aam(c: KDContext):
    return L.affinity(c.s.pixel_logits, c.t.pixel_logits, margin=float(c.options.kd_options.get("aam_margin", 3.0)))


register_kd_term("kmm", KDTerm("loss_KMM", ("pooled",), "W_KMM", 0.0, None, _kmm, "002 Eqs. 5-6"))
register_kd_term("dcgd", KDTerm("loss_DCGD", ("pooled", "images"), "W_DCGD", 0.0, "feature", _dcgd,
                                "001 Eqs. 5-8, 10"))
register_kd_term("msan", KDTerm("loss_MSAN", ("features",), "W_MSAN", 0.0, "latent", _msan, "001 Eqs. 2-4"))
register_kd_term("hint", KDTerm("loss_Hint", ("features",), "W_HINT", 0.0, "feature", _hint, "004 Eq. 2"))
register_kd_term("ctx", KDTerm("loss_CX", ("features",), "W_CTX", 0.0, "feature", _ctx, "004 Eqs. 3-4"))
register_kd_term("lm", KDTerm("loss_LM", ("pixel_logits",), "W_LM", 0.0, None, _lm, "002 Eq. 7"))
register_kd_term("aam", KDTerm("loss_AA", ("pixel_logits",), "W_AAM", 0.0, None, _aam, "002 Eqs. 1-4"))
