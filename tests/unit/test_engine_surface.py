"""Our PipelineEngine class against DeepSpeed's, in one process: it overrides
every method of DeepSpeed's PipelineEngine that could be reached, and
deepspeed.PipelineEngine stays a class that both engines subclass. (Engines
built on real processes, and the names they have:
tests/distributed/test_engine_surface.py.)"""


def test_deepspeeds_pipeline_machinery_is_never_reached_through_our_engine():
    """Ours subclasses DeepSpeed's PipelineEngine for its type only: each of
    that class's public methods, and each private one DeepSpeedEngine also has
    (DeepSpeedEngine's code calls those on self), is overridden by ours."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine

    from deepspeed_pipe_ext.engine import PipelineEngine
    assert issubclass(PipelineEngine, DSPipelineEngine)
    reachable = [name for name, value in vars(DSPipelineEngine).items() if callable(value) and
                 not name.startswith("__") and (not name.startswith("_") or hasattr(DeepSpeedEngine, name))]
    inherited = [name for name in reachable if getattr(PipelineEngine, name) is getattr(DSPipelineEngine, name)]
    assert len(reachable) > 20 and not inherited, inherited


def test_deepspeed_pipeline_engine_stays_a_class_that_builds_the_engine_for_the_module():
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine

    import deepspeed_pipe_ext
    router = deepspeed.PipelineEngine
    assert isinstance(router, type) and issubclass(router, DSPipelineEngine)
    assert issubclass(deepspeed_pipe_ext.PipelineEngine, router) and issubclass(DSPipelineEngine, router)
    assert not issubclass(deepspeed.DeepSpeedEngine, router) and not isinstance(object(), router)

    class UsersEngine(router):  # a subclass of the name is an ordinary class again
        def __init__(self):
            pass

    assert type(UsersEngine()) is UsersEngine and not issubclass(DSPipelineEngine, UsersEngine)
