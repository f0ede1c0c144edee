"""Training objectives: what one optimiser step does with a batch, for the loop of `dforce.trainer`.

Each module holds one objective class meeting `dforce.trainer.Objective`; `dforce.train.OBJECTIVES`
names them for the config's `objective` key.
"""
