"""Drop-in for NVAE's model.py: `from model import AutoEncoder` keeps NVAE's scripts working."""
from miselbo.nvae.flows import CellAR, PairedCellAR
from miselbo.nvae.layers import Cell, DecCombinerCell, EncCombinerCell
from miselbo.nvae.model import AutoEncoder

__all__ = ["AutoEncoder", "Cell", "CellAR", "DecCombinerCell", "EncCombinerCell", "PairedCellAR"]
