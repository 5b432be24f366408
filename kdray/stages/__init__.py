"""The stages, in the order the pipeline calls them: shapes, teacher, distillation inputs,
search, final stage (the report is `kdray.report.write`)."""
