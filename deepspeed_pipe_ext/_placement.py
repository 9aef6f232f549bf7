"""Where a rank's model chunks sit in the pipeline, computed once per engine."""
import functools
from dataclasses import dataclass

from ._native import _C


def model_chunks(module):
    """(model chunks per rank, their layout) of a PipelineModule: ours says;
    DeepSpeed's runs one chunk per rank."""
    return getattr(module, "virtual_stages", 1), getattr(module, "virtual_layout", "interleaved")


@dataclass(frozen=True)
class Placement:
    """This rank's place: `stage` of `stages`, holding `chunks` model chunks
    (virtual stages) placed by `layout` ("interleaved" or "v")."""
    stages: int
    stage: int
    chunks: int = 1
    layout: str = "interleaved"

    @classmethod
    def of(cls, module, stages, stage):
        chunks, layout = model_chunks(module)
        return cls(stages, stage, chunks, layout)

    @functools.cached_property
    def loss_stage(self):
        """The stage holding the last virtual stage, where the loss is
        computed: the last stage, or stage 0 when the chunks sit in a V."""
        return _C.place_of_virtual(self.stages * self.chunks - 1, self.stages, self.layout)[0]

    @property
    def holds_loss(self):
        return self.stage == self.loss_stage

    @property
    def is_first(self):
        return self.stage == 0

    @property
    def is_last(self):
        return self.stage == self.stages - 1

    @property
    def loss_chunk(self):
        """The chunk of the loss stage that computes the loss: its last."""
        return self.chunks - 1
