"""Operations: what the API, admin, dashboard, commands and health worker call down into."""
