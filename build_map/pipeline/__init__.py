"""The builder's pipelines: model + SAE + corpus → bundle, model → trained SAE, and the demo."""
