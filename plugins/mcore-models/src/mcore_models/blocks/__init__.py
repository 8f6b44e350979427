"""Model blocks: norms, attention (MHA/GQA/MQA and MLA), MLPs and the MTP module."""
