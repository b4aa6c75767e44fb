// Command training-operator runs the Kubeflow training-operator (the pinned module's
// controllers, webhooks and certificate rotator) for the test control plane.
//
// It replaces the module's cmd/training-operator.v1 only so the webhook server can be bound
// to one address: upstream passes a port and no host to controller-runtime, which then
// listens on every interface, while every process the tests start must listen on loopback.
// Everything else is the module's exported packages, wired as upstream wires them; only the
// flags the test control plane passes exist here, plus --webhook-server-host. Not carried
// over: --namespace (all namespaces are watched), gang scheduling, leader-election ID,
// client QPS/burst and controller-thread flags (upstream's defaults are used) and the
// init-container and MPI image flags (their upstream defaults are set below).
package main

import (
	"errors"
	"flag"
	"net/http"
	"os"

	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/util/flowcontrol"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	schedulerpluginsv1alpha1 "sigs.k8s.io/scheduler-plugins/apis/scheduling/v1alpha1"
	volcanov1beta1 "volcano.sh/apis/pkg/apis/scheduling/v1beta1"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	"github.com/kubeflow/training-operator/pkg/cert"
	"github.com/kubeflow/training-operator/pkg/config"
	controllerv1 "github.com/kubeflow/training-operator/pkg/controller.v1"
	"github.com/kubeflow/training-operator/pkg/controller.v1/common"
	"github.com/kubeflow/training-operator/pkg/webhooks"
)

const (
	// Fixed in the operator's source and manifests; the test control plane relies on them.
	webhookConfigurationName = "validator.training-operator.kubeflow.org"
	webhookServiceName       = "training-operator"
	webhookSecretName        = "training-operator-webhook-cert"
	leaderElectionID         = "1ca428e5.training-operator.kubeflow.org"
	// Upstream's flag defaults for the API client and the controllers.
	clientQPS         = 20
	clientBurst       = 30
	controllerThreads = 1
)

var log = ctrl.Log.WithName("setup")

func main() {
	var (
		schemes     controllerv1.EnabledSchemes
		metricsAddr string
		probeAddr   string
		webhookHost string
		webhookPort int
		leaderElect bool
		zapOpts     = zap.Options{Development: true, StacktraceLevel: zapcore.DPanicLevel}
		fs          = flag.CommandLine
	)
	fs.Var(&schemes, "enable-scheme", "Job kind to run a controller and webhook for (repeatable, case-insensitive); all when unset.")
	fs.StringVar(&metricsAddr, "metrics-bind-address", "127.0.0.1:8080", "Address of the metrics endpoint.")
	fs.StringVar(&probeAddr, "health-probe-bind-address", "127.0.0.1:8081", "Address of the /healthz and /readyz endpoints.")
	fs.StringVar(&webhookHost, "webhook-server-host", "127.0.0.1", "Address the webhook server listens on (empty: every interface, as upstream).")
	fs.IntVar(&webhookPort, "webhook-server-port", 9443, "Port the webhook server listens on.")
	fs.BoolVar(&leaderElect, "leader-elect", false, "Elect a leader among replicas before running the controllers.")
	zapOpts.BindFlags(fs)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))

	config.Config.PyTorchInitContainerImage = config.PyTorchInitContainerImageDefault
	config.Config.PyTorchInitContainerTemplateFile = config.PyTorchInitContainerTemplateFileDefault
	config.Config.PyTorchInitContainerMaxTries = config.PyTorchInitContainerMaxTriesDefault
	config.Config.MPIKubectlDeliveryImage = config.MPIKubectlDeliveryImageDefault

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(kubeflowv1.AddToScheme(scheme))
	utilruntime.Must(volcanov1beta1.AddToScheme(scheme))
	utilruntime.Must(schedulerpluginsv1alpha1.AddToScheme(scheme))

	restConfig := ctrl.GetConfigOrDie()
	restConfig.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(clientQPS, clientBurst)
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: metricsAddr},
		WebhookServer:          webhook.NewServer(webhook.Options{Host: webhookHost, Port: webhookPort}),
		HealthProbeBindAddress: probeAddr,
		LeaderElection:         leaderElect,
		LeaderElectionID:       leaderElectionID,
	})
	exitOn(err, "creating the manager")

	// The rotator closes certsReady once the serving certificate is in place; controllers,
	// webhooks and readiness wait for it.
	certsReady := make(chan struct{})
	exitOn(cert.ManageCerts(mgr, cert.Config{
		WebhookSecretName:        webhookSecretName,
		WebhookServiceName:       webhookServiceName,
		WebhookConfigurationName: webhookConfigurationName,
	}, certsReady), "setting up certificate rotation")

	exitOn(mgr.AddHealthzCheck("healthz", healthz.Ping), "adding the health check")
	exitOn(mgr.AddReadyzCheck("readyz", func(req *http.Request) error {
		select {
		case <-certsReady:
			return mgr.GetWebhookServer().StartedChecker()(req)
		default:
			return errors.New("certificates are not ready")
		}
	}), "adding the readiness check")

	if schemes.Empty() {
		schemes.FillAll()
	}
	go setupControllers(mgr, schemes, certsReady)

	log.Info("starting manager", "webhookHost", webhookHost, "webhookPort", webhookPort)
	exitOn(mgr.Start(ctrl.SetupSignalHandler()), "running the manager")
}

// setupControllers registers each enabled kind's reconciler and webhook once the
// certificates are ready (as upstream, off the main goroutine so the manager starts first).
func setupControllers(mgr ctrl.Manager, schemes controllerv1.EnabledSchemes, certsReady <-chan struct{}) {
	<-certsReady
	log.Info("certificates ready; registering controllers")
	gang := common.GenNonGangSchedulerSetupFunc()
	for _, kind := range schemes {
		setupReconciler, ok := controllerv1.SupportedSchemeReconciler[kind]
		if !ok {
			exitOn(errors.New("unsupported scheme"), "registering the controller", "scheme", kind)
		}
		exitOn(setupReconciler(mgr, gang, controllerThreads), "registering the controller", "scheme", kind)
		setupWebhook, ok := webhooks.SupportedSchemeWebhook[kind]
		if !ok {
			exitOn(errors.New("unsupported scheme"), "registering the webhook", "scheme", kind)
		}
		exitOn(setupWebhook(mgr), "registering the webhook", "scheme", kind)
	}
}

func exitOn(err error, what string, keysAndValues ...any) {
	if err != nil {
		log.Error(err, what, keysAndValues...)
		os.Exit(1)
	}
}
