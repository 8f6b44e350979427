"""Static protocol conformance of the harness's reference implementations (mypy in ``nox -s lint``)."""

from mcore.protocols import MeshOptimizer, ModelFactory, OptimizerFactory
from mcore_testing.reference import TinyModelFactory, TinyTransformer
from mcore_testing.reference_optim import NamedAdamW, ReferenceAdamW

factory: OptimizerFactory = ReferenceAdamW()
optimizer: MeshOptimizer = NamedAdamW(TinyTransformer(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))


def model_factory(factory: type[TinyModelFactory]) -> ModelFactory:
    return factory
