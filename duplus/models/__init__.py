"""Model families: DuPLUS (``duplus``), its prognosis extension (``prognosis``) and the exported units (``units``)."""
