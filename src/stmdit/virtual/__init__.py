"""Virtual tissue experiments: gene-expression edits to generated tiles (`edits` the grammar,
`experiment` the sampling of unedited and edited tiles, `report` the change, summary and pictures)."""
