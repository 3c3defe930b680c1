"""vramplan's shells: the CLI here, the web app in a later issue. They translate, never compute."""
