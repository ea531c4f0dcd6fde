"""What CI systems read: gates as JUnit XML, and GitHub Actions' job summary."""
