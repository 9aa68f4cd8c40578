-- Run once by the postgres image on an empty data volume: one database per server (and one for `visionflow tune`
-- studies), owned by POSTGRES_USER. `visionflow up --database-url` expects the same three databases.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
