"""vramplan's shells: the command line (app/cli/) and the web app (the pages, the JSON API, the runs API). They translate, never compute."""
