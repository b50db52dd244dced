/** OHIF v3 app config for a viewer beside ct-ai-node (deployment/ohif/README.md): one
 * DICOMweb source, the PACS's DICOMweb (Orthanc's plugin) proxied under /dicom-web on the
 * viewer's own origin, so no CORS setup is needed and Orthanc's bulk-data URIs point back
 * through the proxy. The browser test (tests/test_ohif_viewer.py) serves this same file. */
const DICOMWEB_ROOT = window.location.origin + '/dicom-web';
window.config = {
  name: 'ct-ai-node',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc',
        name: 'orthanc',
        wadoUriRoot: DICOMWEB_ROOT,
        qidoRoot: DICOMWEB_ROOT,
        wadoRoot: DICOMWEB_ROOT,
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
