"""Writing files so that readers never see half of one, local or in cloud storage (gs://, s3://).

- `atomic`: one file replaced whole (JSON records, manifests, reports);
- `publish`: a directory written under a hidden staging name and published whole (model exports);
- `safetensors`: the safetensors format, read with its header checked and written one tensor at a time.

Part of the core: it imports nothing of lmtrain but `lmtrain.paths`.
"""
