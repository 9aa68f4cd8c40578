-- Run once by the postgres image on an empty data volume: one database per server, owned by POSTGRES_USER.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
