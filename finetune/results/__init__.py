"""What a person looks at: the results page (reports/index.html) with its charts, and the versions a run used."""
