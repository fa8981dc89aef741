"""The whole params.yaml model: the sections of `core.settings`, the soups to build (checked against the soup
registry) and the tracking section. params.yaml is the single source of truth; unknown keys fail loudly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from .core.settings import (
    DataParams,
    EvaluateParams,
    ImportParams,
    ModelParams,
    PretrainParams,
    SoupSettings,
    Strict,
    SweepParams,
    error_lines,
    load_yaml,
    parse_section,
)
from .soups import SPECS, get_spec


def soup_methods(*, refining: bool | None = None) -> list[str]:
    """Every soup the registry can build (from the method specs in soup_pipeline.soups); with `refining`, only
    those that refine a built soup (True: listed under soup.refine) or only the others (False: soup.methods)."""
    return [name for name, spec in SPECS.items() if spec.kind == "soup" and refining in (None, spec.refines)]


def method_params_type(name: str) -> type[SoupSettings]:
    """The parameter model the method `name` declares in its spec."""
    return get_spec(name).params


def _check_soups(names: list[str], *, refining: bool | None = None, section: str = "methods") -> None:
    known = soup_methods(refining=refining)
    unknown = [name for name in names if name not in known]
    if unknown:
        elsewhere = [name for name in unknown if name in soup_methods()]
        where = (f" ({elsewhere} belong under soup.{'methods' if refining else 'refine'}: soup.refine holds the soups "
                 "built on another soup, soup.methods the others)") if elsewhere else ""
        raise ValueError(f"{section}: unknown soup methods {unknown}; choose from {known}{where} "
                         "(best individual and the ensemble are always evaluated, never built)")


class SoupParams(SoupSettings):
    """The `soup` section: the settings every soup shares, and the soups to build with their own parameters.

    `methods` maps each soup to build (one DVC stage each; best individual and the ensemble are
    always evaluated, never built) to that method's own parameters, declared by its module's spec;
    a key given there overrides the shared one for that method only.
    """

    methods: dict[str, dict | None] = Field(default_factory=lambda: {name: {} for name in soup_methods(refining=False)})
    refine: dict[str, dict | None] = {}  # soups built on a soup of `methods` (named by their `soup` key), after it
    side_by_side: bool = False  # `soup-pipeline run`: soups on different GPUs build at the same time (each GPU's in
    # turn; their seconds then share the host's cores and disk); false: one after another, each timed alone

    @model_validator(mode="after")
    def _methods(self) -> "SoupParams":
        if not self.methods:
            raise ValueError("methods: empty; list at least one soup to build")
        _check_soups(list(self.methods), refining=False)
        _check_soups(list(self.refine), refining=True, section="refine")
        for name in self.built:
            settings = self.method(name)
            if name in self.refine and settings.soup not in self.methods:
                raise ValueError(f"refine.{name}.soup: {settings.soup!r} is not built; name one of soup.methods "
                                 f"{list(self.methods)}")
        return self

    @property
    def built(self) -> list[str]:
        """Every soup to build, in an order that builds each refined soup before its refinement."""
        return [*self.methods, *self.refine]

    def method(self, name: str) -> SoupSettings:
        """The typed parameters of `name`: the shared settings with its own section on top (its
        declared defaults when it is not listed)."""
        section = "refine" if name in self.refine else "methods"
        shared = self.model_dump(exclude={"methods", "refine", "side_by_side"})
        values = {**shared, **(getattr(self, section).get(name) or {})}
        try:
            return method_params_type(name).model_validate(values)
        except ValidationError as exc:
            raise ValueError("\n  ".join(error_lines(exc, prefix=f"{section}.{name}."))) from None


AUTO = "auto"  # tracking.register_method: register the model select data prefer (soup_pipeline.evaluation.selection)


class TrackingParams(Strict):
    """MLflow: where runs go (MLFLOW_TRACKING_URI wins) and which soup is registered."""

    enabled: bool = True  # log runs to MLflow (a local SQLite file when no URI is set)
    experiment: str = "soup-pipeline"  # MLflow experiment name
    registered_model: str = "soup-pipeline-soup"  # registry name of the soup
    register_method: str = "auto"  # registered at the end of a run: auto (the model select data prefer) or a soup
    system_metrics: bool = True  # log CPU / memory / GPU usage while the pipeline runs

    @field_validator("register_method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method != AUTO:
            _check_soups([method], section="register_method")
        return method


class Params(Strict):
    """Everything params.yaml holds, one section per stage."""

    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    sweep: SweepParams = SweepParams()
    imports: ImportParams = ImportParams()
    soup: SoupParams = Field(default_factory=SoupParams)  # built on use: its default lists the registry's soups
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _imports_after_the_sweep(self) -> "Params":
        if self.imports.sources and self.imports.first_member <= max(self.sweep.members):
            raise ValueError(f"imports.first_member: {self.imports.first_member} is not above the sweep's member ids "
                             f"(up to {max(self.sweep.members)}); imported and fine-tuned members need ids of their "
                             "own")
        return self

    @model_validator(mode="after")
    def _registered_soup_is_built(self) -> "Params":
        if self.tracking.enabled and self.tracking.register_method not in (AUTO, *self.soup.built):
            raise ValueError(f"tracking.register_method: {self.tracking.register_method!r} is not built; "
                             f"add it to soup.methods (or soup.refine) or register one of {self.soup.built}")
        return self


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate params.yaml (with optional nested overrides); a bad key is one clear SoupError."""
    data = load_yaml(path)
    for section, values in (overrides or {}).items():
        data[section] = {**(data.get(section) or {}), **values}
    return parse_section(Params, data, str(path))
