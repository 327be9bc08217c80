"""Label conventions shared by the data pipeline and the losses."""

#: the label of a position that carries no loss (prompt and padding tokens): PyTorch's and transformers'
#: ``ignore_index`` convention
IGNORE_INDEX = -100
