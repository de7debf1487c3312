"""Training stages on Ray Train + DeepSpeed ZeRO: SFT (`stemqa.train.sft.run_sft`) and DPO
(`stemqa.train.dpo.run_dpo`), with the DPO losses in `stemqa.train.losses`."""
