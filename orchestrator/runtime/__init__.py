"""What every run on Ray Train workers shares, training and evaluation alike.

- :mod:`.model_setup`: the one model-setup path: the model config the driver derives, the
  workload's model built on a worker with its tokenizer and batch constants, weights loaded into it;
- :mod:`.ray_train`: the one ``TorchTrainer`` builder, the split of the datasets across the
  workers, and how a run's frozen plan travels to them.
"""
