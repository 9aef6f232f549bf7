"""What stands at `deepspeed.PipelineEngine` once deepspeed_pipe_ext is
imported: deepspeed.initialize builds ours or DeepSpeed's pipeline engine
through it (engine_class_for)."""
from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule as DSPipelineModule

# ---------------------------------------------------------------------- deepspeed.initialize integration
_ADOPT_DEEPSPEED_MODULES = False


def engine_class_for(model, config_class=None):
    """The engine deepspeed.initialize builds for `model`: ours for our
    PipelineModule (or any PipelineModule once adopted), DeepSpeed's for
    anything else."""
    from .engine import PipelineEngine
    from .module import PipelineModule as OurPipelineModule
    if isinstance(model, OurPipelineModule) or (_ADOPT_DEEPSPEED_MODULES and isinstance(model, DSPipelineModule)):
        return PipelineEngine
    return DSPipelineEngine


class _BuildsTheEngineForTheModel(type):
    """The metaclass of PipelineEngineRouter: calling the router builds the
    engine engine_class_for picks; type checks against it answer as they would
    against DeepSpeed's PipelineEngine (which ours subclasses). Subclasses of
    the router are ordinary classes."""

    def __call__(cls, *args, **kwargs):
        if cls is PipelineEngineRouter:
            return engine_class_for(kwargs.get("model"), kwargs.get("config_class"))(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __instancecheck__(cls, instance):
        if cls is PipelineEngineRouter:
            return isinstance(instance, DSPipelineEngine)
        return super().__instancecheck__(instance)

    def __subclasscheck__(cls, subclass):
        if cls is PipelineEngineRouter:
            return issubclass(subclass, DSPipelineEngine)
        return super().__subclasscheck__(subclass)


class PipelineEngineRouter(DSPipelineEngine, metaclass=_BuildsTheEngineForTheModel):
    """What stands at `deepspeed.PipelineEngine` once deepspeed_pipe_ext is
    imported. deepspeed.initialize calls that name to build a pipeline
    engine: the router builds ours or DeepSpeed's (engine_class_for). It stays
    a class, so `isinstance(engine, deepspeed.PipelineEngine)` holds for both
    engines, as Megatron-DeepSpeed's training loop and DeepSpeed's own code
    expect; DeepSpeed's class stays at deepspeed.runtime.pipe.engine."""


def install():
    """Route deepspeed.initialize's pipeline engine through engine_class_for.

    deepspeed.initialize looks up `PipelineEngine` in the deepspeed module when
    it runs, so replacing that name with the router is enough."""
    import deepspeed
    deepspeed.PipelineEngine = PipelineEngineRouter


def run_deepspeed_pipelines_on_this_engine(enabled=True):
    """Also build our engine for DeepSpeed's own deepspeed.pipe.PipelineModule models."""
    global _ADOPT_DEEPSPEED_MODULES
    install()
    _ADOPT_DEEPSPEED_MODULES = bool(enabled)
