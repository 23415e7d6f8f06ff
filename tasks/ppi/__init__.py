"""PPI reproduction (Raghu et al. 2021, Section 5; data and GIN of Hu et al. 2020).

``python -m tasks ppi --help``. Modules: data (real loader, batching, species split),
synthetic (stand-in generator with ground truth), config, finetune (FT protocol), methods
(the PT methods), cli, plots.
"""
