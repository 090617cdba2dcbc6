"""Label audit: out-of-fold probabilities, suspected label errors, the HTML report and its CSV files."""
