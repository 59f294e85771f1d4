"""What ``edgeprune inspect`` reports: the discovered decoder (``describe``) and its FLOPs (``flops``)."""
