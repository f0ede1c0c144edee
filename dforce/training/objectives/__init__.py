"""Training objectives: what one optimiser step does with a batch, for the loop of `dforce.training.trainer`.

Each module holds one objective class meeting `dforce.training.trainer.Objective`;
`dforce.training.train.OBJECTIVES` names them for the config's `objective` key.
"""
