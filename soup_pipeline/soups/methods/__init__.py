"""The souping methods, one module each declaring its `SPECS`: uniform, greedy, learned, MEHL-Soup(+) and HL-Soup(+)
(hyperplane), the searched MEHL-Soup+ (search), and the merge methods (task arithmetic, TIES, DARE, Model Stock,
WiSE-FT)."""
