"""The MidPO mixture of experts: gates over two frozen expert LoRAs (core), router data and training,
packaging and serving."""
